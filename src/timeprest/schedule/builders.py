"""Schedule builders: ``gpipe`` and ``1f1b`` (flush) and ``nf1b`` and ``2bw`` (list rule).

A :class:`Schedule` is data: one program (list of actions) per stage, fixed
before training. The engines run exactly these programs.

The list rule orders the asynchronous schedules. Example, ``nf1b`` with
W = 2, N = 2 and the default costs (forward 1, backward 2 per micro-batch,
so ``B{t}`` lasts 4 units)::

    stage 0 | F0.0 F0.1 F1.0 F1.1 -    -    B0   B0   B0   B0   F2.0 ...
    stage 1 | -    F0.0 F0.1 B0   B0   B0   B0   F1.0 F1.1 B1   ...
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass

from timeprest.errors import ConfigError, MultipleSequenceWarning, ScheduleError
from timeprest.schedule.actions import Action, parse_program
from timeprest.schedule.costs import Costs, CostSpec, resolve_costs
from timeprest.schedule.deps import BackwardUnit, deps
from timeprest.schedule.grid import format_grid
from timeprest.schedule.replay import Timeline, replay
from timeprest.schedule.validate import validate

SCHEDULE_KINDS: tuple[str, ...] = ("gpipe", "1f1b", "nf1b", "2bw")


@dataclass(frozen=True)
class Schedule:
    """Per-stage programs for ``num_minibatches`` mini-batches of ``num_microbatches`` each."""

    kind: str
    num_stages: int
    num_microbatches: int
    num_minibatches: int
    programs: tuple[tuple[Action, ...], ...]
    costs: Costs

    @property
    def backward_unit(self) -> BackwardUnit:
        return backward_unit_of(self.kind)

    def deps(self, stage: int, action: Action) -> list[tuple[int, Action]]:
        return deps(stage, action, self.num_stages, self.num_microbatches, self.backward_unit)

    def timeline(self, costs: CostSpec | None = None) -> Timeline:
        """Replay the programs under ``costs`` (the schedule's own costs by default)."""
        c = self.costs if costs is None else resolve_costs(costs, self.num_stages)
        return replay(self.programs, c, self.num_microbatches, self.backward_unit)

    def grid(self, costs: CostSpec | None = None) -> str:
        return format_grid(self.timeline(costs))

    def to_text(self) -> list[list[str]]:
        return [[str(a) for a in p] for p in self.programs]


def has_multiple_sequences(kind: str, num_stages: int, num_microbatches: int) -> bool:
    """The multiple-sequence rule: nF1B with N < W-1 splits the updates into independent chains."""
    return kind == "nf1b" and num_microbatches < num_stages - 1


def multiple_sequence_message(num_stages: int, num_microbatches: int) -> str:
    return (
        f"nF1B with N={num_microbatches} micro-batches < W-1={num_stages - 1}: the "
        "multiple-sequence problem (the updates split into independent chains of "
        "mini-batches); use N >= W-1"
    )


def check_schedule_size(kind: str, num_stages: int, num_microbatches: int) -> None:
    """The one size rule of the schedule kinds: 2bw needs N >= W (its double buffer)."""
    if kind == "2bw" and num_microbatches < num_stages:
        raise ConfigError(
            f"2bw needs at least as many micro-batches as stages (N >= W), got "
            f"N={num_microbatches}, W={num_stages}: use --microbatches {num_stages} or more"
        )


def backward_unit_of(kind: str) -> BackwardUnit:
    return "minibatch" if kind == "nf1b" else "microbatch"


def _check_sizes(num_stages: int, num_microbatches: int, num_minibatches: int) -> None:
    for name, v in (
        ("number of stages", num_stages),
        ("number of micro-batches", num_microbatches),
        ("number of mini-batches", num_minibatches),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"the {name} must be an integer >= 1, got {v!r}")


def gpipe_programs(w: int, n: int, t_count: int) -> list[list[Action]]:
    """Per mini-batch: all forwards, the backwards in reverse, then the update."""
    progs: list[list[Action]] = [[] for _ in range(w)]
    for prog in progs:
        for t in range(t_count):
            prog.extend(Action("F", t, j) for j in range(n))
            prog.extend(Action("B", t, j) for j in reversed(range(n)))
            prog.append(Action("U", t))
    return progs


def one_f_one_b_programs(w: int, n: int, t_count: int) -> list[list[Action]]:
    """Per mini-batch: ``min(W-s-1, N)`` warm-up forwards, then one forward / one backward, then drain."""
    progs: list[list[Action]] = []
    for s in range(w):
        prog: list[Action] = []
        warm = min(w - s - 1, n)
        for t in range(t_count):
            prog.extend(Action("F", t, j) for j in range(warm))
            nb = 0
            for j in range(warm, n):
                prog.append(Action("F", t, j))
                prog.append(Action("B", t, nb))
                nb += 1
            prog.extend(Action("B", t, j) for j in range(nb, n))
            prog.append(Action("U", t))
        progs.append(prog)
    return progs


def list_rule_programs(
    w: int, n: int, t_count: int, unit: BackwardUnit, costs: Costs
) -> list[list[Action]]:
    """The greedy event-driven order of docs/design.md section 4.

    Whenever a stage is idle at time tau it starts the oldest ready backward,
    else the next forward in (t, j) order if the in-flight limit allows: at
    stage s at most W - s units (mini-batches for ``minibatch``, micro-batches
    for ``microbatch``) may have a forward done and their backward not done;
    continuing a mini-batch already in flight is always allowed. ``U{t}``
    follows the last backward of ``t`` immediately. Stages idle at the same
    tau decide independently: every action started at tau ends after tau.
    """
    forwards = [Action("F", t, j) for t in range(t_count) for j in range(n)]
    per_stage = len(forwards) + (t_count if unit == "minibatch" else len(forwards)) + t_count

    end: dict[tuple[int, Action], float] = {}
    progs: list[list[Action]] = [[] for _ in range(w)]
    next_fwd = [0] * w  # index into ``forwards``
    # units (a mini-batch's B{t} or a micro-batch's B{t}.{j}) whose forward has
    # started at the stage and whose backward has not, oldest first
    in_flight: list[list[Action]] = [[] for _ in range(w)]
    busy_until = [0.0] * w
    events: list[float] = [0.0]
    tau = 0.0

    def ready(s: int, a: Action) -> bool:
        for d in deps(s, a, w, n, unit):
            e = end.get(d)
            if e is None or e + costs.comm_delay(d[0], s) > tau:
                return False
        return True

    def finish(s: int, a: Action, stop: float) -> None:
        end[(s, a)] = stop
        busy_until[s] = stop
        progs[s].append(a)
        heapq.heappush(events, stop)
        for nb in (s - 1, s + 1):
            if 0 <= nb < w:
                heapq.heappush(events, stop + costs.comm_delay(s, nb))

    while events:
        tau = heapq.heappop(events)
        while events and events[0] <= tau:
            heapq.heappop(events)
        for s in range(w):
            if busy_until[s] > tau:
                continue
            chosen: Action | None = None
            for b in in_flight[s]:  # the oldest ready backward first
                if ready(s, b):
                    chosen = b
                    break
            if chosen is not None:
                in_flight[s].remove(chosen)
                finish(s, chosen, tau + costs.duration(s, chosen, n))
                t = chosen.minibatch
                if not any(b.minibatch == t for b in in_flight[s]) and (
                    unit == "minibatch" or chosen.microbatch == n - 1
                ):
                    upd = Action("U", t)
                    finish(s, upd, busy_until[s] + costs.duration(s, upd, n))
                continue
            if next_fwd[s] >= len(forwards):
                continue
            f = forwards[next_fwd[s]]
            continuing = unit == "minibatch" and f.microbatch != 0
            if not (continuing or len(in_flight[s]) < w - s) or not ready(s, f):
                continue
            next_fwd[s] += 1
            finish(s, f, tau + costs.duration(s, f, n))
            if unit == "minibatch" and f.microbatch == 0:
                in_flight[s].append(Action("B", f.minibatch))
            elif unit == "microbatch":
                in_flight[s].append(Action("B", f.minibatch, f.microbatch))
    if any(len(p) != per_stage for p in progs):
        raise ScheduleError(
            "internal: the list rule stalled; partial programs:\n"
            + "\n".join(f"stage {s} | {' '.join(map(str, p))}" for s, p in enumerate(progs))
        )
    return progs


def build_schedule(
    kind: str,
    num_stages: int,
    num_microbatches: int,
    num_minibatches: int,
    costs: CostSpec | None = "default",
    *,
    warn: bool = True,
) -> Schedule:
    """Build and validate the programs of a schedule.

    ``kind``: ``gpipe``, ``1f1b``, ``nf1b`` or ``2bw``. ``costs``: ``default``
    (forward 1, backward 2 per micro-batch), ``paper`` (every action 1) or
    per-stage :class:`Costs`; only the list-rule schedules depend on it.
    """
    if kind not in SCHEDULE_KINDS:
        raise ConfigError(f"unknown schedule {kind!r}: expected one of {', '.join(SCHEDULE_KINDS)}")
    _check_sizes(num_stages, num_microbatches, num_minibatches)
    c = resolve_costs(costs, num_stages)
    w, n, tc = num_stages, num_microbatches, num_minibatches
    check_schedule_size(kind, w, n)
    if warn and has_multiple_sequences(kind, w, n):
        warnings.warn(multiple_sequence_message(w, n), MultipleSequenceWarning, stacklevel=2)
    unit = backward_unit_of(kind)
    if kind == "gpipe":
        progs = gpipe_programs(w, n, tc)
    elif kind == "1f1b":
        progs = one_f_one_b_programs(w, n, tc)
    else:
        progs = list_rule_programs(w, n, tc, unit, c)
    validate(progs, w, n, tc, unit)
    return Schedule(kind, w, n, tc, tuple(tuple(p) for p in progs), c)


def schedule_from_programs(
    kind: str,
    programs: list[list[Action]],
    num_microbatches: int,
    num_minibatches: int,
    costs: CostSpec | None = "default",
) -> Schedule:
    """Wrap hand-written programs (validated) as a :class:`Schedule`."""
    w = len(programs)
    _check_sizes(w, num_microbatches, num_minibatches)
    validate(programs, w, num_microbatches, num_minibatches, backward_unit_of(kind))
    return Schedule(
        kind,
        w,
        num_microbatches,
        num_minibatches,
        tuple(tuple(p) for p in programs),
        resolve_costs(costs, w),
    )


def schedule_from_text(text: str, costs: CostSpec = "default") -> Schedule:
    """A schedule from program text: one line per stage, actions separated by spaces.

    ``B{t}`` (a whole mini-batch's backward) makes it an nF1B-style program; ``B{t}.{j}``
    a per-micro-batch one. N and T are read off the actions; the programs are validated.
    """
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    try:
        programs = [parse_program(ln.split("|")[-1]) for ln in lines]
    except Exception as exc:
        raise ConfigError(f"cannot read the schedule text: {exc}") from None
    actions = [a for prog in programs for a in prog]
    if not actions:
        raise ConfigError("the schedule text holds no actions")
    n = 1 + max((a.microbatch or 0) for a in actions)
    t = 1 + max(a.minibatch for a in actions)
    whole = any(a.kind == "B" and a.microbatch is None for a in actions)
    return schedule_from_programs("nf1b" if whole else "custom", programs, n, t, costs)
