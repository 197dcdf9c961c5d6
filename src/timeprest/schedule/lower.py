"""Lowering: a schedule's programs with their messages written out as actions.

A :class:`~timeprest.schedule.Schedule` says what each stage computes and in
which order; which messages flow between stages follows from
:func:`~timeprest.schedule.deps` (an action receives from each other stage it
depends on, and sends to each neighbour whose same action depends on it).
``lower`` turns that into data: per stage, one list of :class:`Op`, where a
computation is surrounded by the receives it needs and the sends it makes,
per micro-batch::

    stage 1 of gpipe, W=3, N=2:   <F0.0 F0.0 >F0.0 <F0.1 F0.1 >F0.1
                                  <B0.1 B0.1 >B0.1 <B0.0 B0.0 >B0.0 U0

``<F0.0``: receive the activation that ``F0.0`` consumes (from stage s-1);
``>F0.0``: send ``F0.0``'s output (to stage s+1); ``<B0.1``: receive the
output gradient of micro-batch 0.1 (from s+1); ``>B0.1``: send the input
gradient (to s-1). An nF1B backward ``B{t}`` lowers to one receive, compute and
send per micro-batch, each compute tagged with its action ``B{t}``.

The emulator and the runtime execute these lists (docs/design.md section
14), so the order of messages is no longer a property of the stage code: a
permuted receive order is caught by the emulator's checking transport.
Pure Python, like the rest of this package.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from timeprest.errors import ScheduleError
from timeprest.schedule.actions import Action
from timeprest.schedule.builders import Schedule

Kind = Literal["act", "grad"]  # activation to stage s+1, gradient to stage s-1
OpKind = Literal["recv", "run", "send"]


@dataclass(frozen=True)
class Message:
    """One tensor from ``src`` to ``dst``: an activation (``act``) or a gradient (``grad``)."""

    kind: Kind
    src: int
    dst: int
    minibatch: int
    microbatch: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.minibatch, self.microbatch)

    def describe(self, backward_unit: str = "microbatch") -> str:
        t, j = self.minibatch, self.microbatch
        if self.kind == "act":
            return f"the activation of F{t}.{j} from stage {self.src}"
        action = f"B{t}" if backward_unit == "minibatch" else f"B{t}.{j}"
        return f"the gradient of {action} (micro-batch {t}.{j}) from stage {self.src}"


@dataclass(frozen=True)
class Op:
    """One step of a lowered program.

    ``action`` is the program action the step belongs to and ``index`` its
    position in the stage's program; ``microbatch`` the micro-batch it works on
    (None for an update). ``first``/``last``: the step opens/closes its action.
    """

    op: OpKind
    action: Action
    index: int
    microbatch: int | None
    message: Message | None = None
    first: bool = False
    last: bool = False

    def __str__(self) -> str:
        a = self.action
        body = str(a) if a.kind == "U" else f"{a.kind}{a.minibatch}.{self.microbatch}"
        return {"recv": "<", "send": ">", "run": ""}[self.op] + body


@dataclass(frozen=True)
class Lowered:
    """The lowered programs of a schedule (one tuple of ops per stage)."""

    schedule: Schedule
    programs: tuple[tuple[Op, ...], ...]

    def text(self, stage: int) -> str:
        return " ".join(str(op) for op in self.programs[stage])

    def messages(self, stage: int, op: OpKind) -> list[Message]:
        """The messages ``stage`` receives (``op="recv"``) or sends, in program order."""
        out = []
        for o in self.programs[stage]:
            if o.op == op:
                assert o.message is not None
                out.append(o.message)
        return out


def _lower_stage(schedule: Schedule, stage: int) -> tuple[Op, ...]:
    w, n = schedule.num_stages, schedule.num_microbatches
    out: list[Op] = []
    for i, a in enumerate(schedule.programs[stage]):
        if a.kind == "U":
            out.append(Op("run", a, i, None, first=True, last=True))
            continue
        sources = sorted({p for p, _ in schedule.deps(stage, a) if p != stage})
        targets = [
            q for q in (stage - 1, stage + 1) if 0 <= q < w and (stage, a) in schedule.deps(q, a)
        ]
        start = len(out)
        for j in a.microbatches(n):
            for p in sources:
                kind: Kind = "act" if p < stage else "grad"
                out.append(Op("recv", a, i, j, Message(kind, p, stage, a.minibatch, j)))
            out.append(Op("run", a, i, j))
            for q in targets:
                kind = "act" if q > stage else "grad"
                out.append(Op("send", a, i, j, Message(kind, stage, q, a.minibatch, j)))
        out[start] = replace(out[start], first=True)
        out[-1] = replace(out[-1], last=True)
    return tuple(out)


def lower(schedule: Schedule) -> Lowered:
    """Lower every stage's program; checks that each channel's two ends agree on its order."""
    programs = tuple(_lower_stage(schedule, s) for s in range(schedule.num_stages))
    lowered = Lowered(schedule, programs)
    check_channels(lowered)
    return lowered


def check_channels(lowered: Lowered) -> None:
    """Every message sent is received, on each channel in the order it was sent."""
    w = lowered.schedule.num_stages
    for s in range(w):
        for q in (s - 1, s + 1):
            if not 0 <= q < w:
                continue
            sent = [m for m in lowered.messages(s, "send") if m.dst == q]
            got = [m for m in lowered.messages(q, "recv") if m.src == s]
            if sent != got:
                first = next(
                    (i for i, (a, b) in enumerate(zip(sent, got)) if a != b),
                    min(len(sent), len(got)),
                )
                unit = lowered.schedule.backward_unit
                what_sent = sent[first].describe(unit) if first < len(sent) else "nothing more"
                what_got = got[first].describe(unit) if first < len(got) else "nothing more"
                raise ScheduleError(
                    f"stages {s} and {q} disagree on the order of their messages: message "
                    f"{first} from stage {s} to stage {q} is sent as {what_sent} but received "
                    f"as {what_got}"
                )
