"""The point-to-point transport of one rank: receives posted ahead, sends kept until proved done.

Receives are posted ahead (``lookahead`` per channel) into buffers of the
agreed shape; sends are asynchronous, and their handles are kept until the
message plan (:mod:`timeprest.engine.runtime.messages`) proves them
complete. Shapes are agreed once per micro-batch size: the first activation
of each size is preceded by a header (:mod:`timeprest.engine.runtime.wire`).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from timeprest.engine.runtime.failures import CommError
from timeprest.engine.runtime.messages import plan_messages
from timeprest.engine.runtime.wire import HEADER, Spec, decode, encode
from timeprest.errors import ScheduleError, ShapeError, TimeprestError
from timeprest.schedule.lower import Kind, Lowered, Op

Key = tuple[int, int]


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (what ``dist.isend``/``irecv`` send)."""
    return torch.view_as_real(t) if t.is_complex() else t


def describe(kind: Kind, key: Key, backward_unit: str) -> str:
    """How messages name the message ``kind`` of micro-batch ``key`` (both transports)."""
    t, j = key
    if kind == "act":
        return f"the activation of F{t}.{j}"
    action = f"B{t}" if backward_unit == "minibatch" else f"B{t}.{j}"
    return f"the gradient of {action} (micro-batch {t}.{j})"


def check_order(
    seq: list[Key], done: int, key: Key, stage: int, what: str, verb: str = "sends"
) -> None:
    """A send (a receive: ``verb="asked for"``) must be the next of its channel in the
    message plan, ``seq`` in order, ``done`` of them made already."""
    if done >= len(seq) or seq[done] != key:
        raise ScheduleError(f"internal: stage {stage} {verb} {what} out of order")


def agree_shape(
    shapes_in: dict[int, Spec],
    shapes_out: dict[int, Spec],
    kind: Kind,
    key: Key,
    rows: int,
    x: Tensor,
    stage: int,
    what: str,
) -> Tensor | None:
    """Check ``x`` against the shape agreed for its micro-batch size (both transports).

    An activation must match the first one of its size (which this records and
    whose header it returns); a gradient, the activation it belongs to (what
    was received). Returns the header to announce a new size, else None.
    """
    table = shapes_out if kind == "act" else shapes_in
    spec = table.get(rows)
    if spec is None:
        if kind == "grad":
            raise ScheduleError(f"internal: stage {stage} sends {what} before receiving its input")
        header = encode(x, stage, key)
        table[rows] = (tuple(x.shape), x.dtype)
        return header
    if spec != (tuple(x.shape), x.dtype):
        name = "output" if kind == "act" else "input gradient"
        raise ShapeError(
            f"stage {stage}'s {name} for micro-batch {key[0]}.{key[1]} ({rows} rows) "
            f"has shape {tuple(x.shape)} and dtype {x.dtype}, but the first micro-batch "
            f"of {rows} rows had shape {spec[0]} and dtype {spec[1]}: the distributed "
            "runtime needs one output shape per micro-batch size"
        )
    return None


@dataclass
class _Posted:
    work: Any
    buffer: Tensor
    header: bool  # the header of the message, its payload not posted yet


@dataclass
class _Channel:
    kind: Kind
    peer: int
    keys: list[Key]
    posted: dict[Key, _Posted] = field(default_factory=dict)
    next_post: int = 0
    consumed: int = 0
    header_pending: bool = False


class P2PTransport:
    """The :class:`~timeprest.engine.executor.Transport` of one rank over point-to-point messages.

    ``shapes_in[rows]`` / ``shapes_out[rows]``: the (shape, dtype) of the activation
    of a micro-batch of ``rows`` rows into and out of this stage, as agreed by the
    headers (the gradients have the shape of the activation they belong to). They
    outlive one ``train()`` call, so the caller owns them. ``ranks[s]`` is the global
    rank of stage s of this rank's replica (default: rank s).
    """

    def __init__(
        self,
        lowered: Lowered,
        stage: int,
        micro_rows: list[list[int]],
        shapes_in: dict[int, Spec],
        shapes_out: dict[int, Spec],
        *,
        device: torch.device,
        timeout: float,
        lookahead: int,
        ordered: bool,
        ranks: Sequence[int] | None = None,
        groups: dict[Kind, Any] | None = None,
    ) -> None:
        self.stage = stage
        self.ranks = list(ranks) if ranks is not None else list(range(lowered.schedule.num_stages))
        schedule = lowered.schedule
        self.num_microbatches = schedule.num_microbatches
        self.backward_unit = schedule.backward_unit
        self.plan = plan_messages(lowered, stage)
        self.rows = micro_rows
        self.shapes_in = shapes_in
        self.shapes_out = shapes_out
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout)
        self.lookahead = lookahead
        # NCCL runs the operations between two ranks in issue order, so a receive must
        # not be posted before a send that precedes it in the program; gloo matches by tag
        self.ordered = ordered
        self.channels: dict[Kind, _Channel] = {}
        if stage > 0:
            self.channels["act"] = _Channel("act", self.ranks[stage - 1], self.plan.recv["act"])
        if stage < schedule.num_stages - 1:
            self.channels["grad"] = _Channel("grad", self.ranks[stage + 1], self.plan.recv["grad"])
        self.sent_count: dict[Kind, int] = {"act": 0, "grad": 0}
        self.waited = 0.0  # seconds in the handles' waits (the executor's Transport.waited)
        # handles (and tensors, which must stay alive) of sends not yet known complete
        self.in_flight: dict[tuple[Kind, Key], list[tuple[Any, Tensor]]] = {}
        # the world group's own send/recv: dist.isend/irecv check their arguments at
        # every call (about 20 us each on a CPU, a tenth of a small micro-batch's work);
        # ours are checked once here (dense real tensors, world ranks)
        world = dist.group.WORLD
        if world is None:
            raise ScheduleError("internal: the point-to-point transport needs a process group")
        # ``groups``: a process group per channel kind, so that activations and gradients
        # between two ranks go over two connections (gloo: sends and receives in the two
        # directions of one pair wait on each other, up to milliseconds a message)
        self._groups: dict[Kind, Any] = groups or {"act": world, "grad": world}

    # -- naming, for messages ------------------------------------------------------
    def describe(self, kind: Kind, key: Key) -> str:
        return describe(kind, key, self.backward_unit)

    def _tag(self, kind: Kind, key: Key, header: bool) -> int:
        t, j = key
        return ((t * self.num_microbatches + j) * 4 + 2 * header + (kind == "grad")) % 2**31

    def _wait(self, work: Any, peer: int, what: str) -> None:
        t0 = time.perf_counter()
        try:
            if self.ordered:
                # NCCL: the wait only orders the compute stream after the transfer (a
                # timeout would block the CPU); the NCCL watchdog enforces the timeout
                work.wait()
            else:
                work.wait(self.timeout)
        except Exception as exc:
            raise CommError(peer, what, exc) from exc
        finally:
            self.waited += time.perf_counter() - t0

    def _irecv(self, buf: Tensor, peer: int, kind: Kind, tag: int, what: str) -> Any:
        try:
            return self._groups[kind].recv([_real(buf)], peer, tag)
        except Exception as exc:
            raise CommError(peer, what, exc) from exc

    def _isend(self, x: Tensor, peer: int, kind: Kind, tag: int) -> Any:
        return self._groups[kind].send([_real(x)], peer, tag)

    # -- receiving -----------------------------------------------------------------
    def _post_one(self, ch: _Channel) -> bool:
        """Post the next receive of ``ch``; False when it cannot be posted yet."""
        key = ch.keys[ch.next_post]
        # our sends go to this channel's peer on the other channel kind
        back: Kind = "act" if ch.kind == "grad" else "grad"
        if self.ordered and self.sent_count[back] < self.plan.sends_before[(ch.kind, key)]:
            return False
        rows = self.rows[key[0]][key[1]]
        spec = (self.shapes_in if ch.kind == "act" else self.shapes_out).get(rows)
        what = self.describe(ch.kind, key)
        if spec is None:
            if ch.kind == "grad":
                return False  # our own output of that size is not known yet
            buf = torch.empty(HEADER, dtype=torch.int64, device=self.device)
            work = self._irecv(buf, ch.peer, ch.kind, self._tag(ch.kind, key, True), what)
            ch.posted[key] = _Posted(work, buf, header=True)
            ch.header_pending = True
        else:
            buf = torch.empty(spec[0], dtype=spec[1], device=self.device)
            work = self._irecv(buf, ch.peer, ch.kind, self._tag(ch.kind, key, False), what)
            ch.posted[key] = _Posted(work, buf, header=False)
        ch.next_post += 1
        return True

    def pump(self) -> None:
        """Post the receives that can be posted now, up to ``lookahead`` per channel."""
        for ch in self.channels.values():
            while (
                ch.next_post < len(ch.keys)
                and not ch.header_pending
                and ch.next_post - ch.consumed < self.lookahead
                and self._post_one(ch)
            ):
                pass

    def _recv(self, kind: Kind, key: Key) -> Tensor:
        ch = self.channels[kind]
        what = self.describe(kind, key)
        check_order(ch.keys, ch.consumed, key, self.stage, what, "asked for")
        while key not in ch.posted:
            if ch.header_pending or not self._post_one(ch):
                raise ScheduleError(f"internal: stage {self.stage} cannot post {what}")
        posted = ch.posted.pop(key)
        if posted.header:
            self._wait(posted.work, ch.peer, what)
            spec = decode(posted.buffer)
            self.shapes_in[self.rows[key[0]][key[1]]] = spec
            ch.header_pending = False
            buf = torch.empty(spec[0], dtype=spec[1], device=self.device)
            posted = _Posted(
                self._irecv(buf, ch.peer, kind, self._tag(kind, key, False), what),
                buf,
                header=False,
            )
        self._wait(posted.work, ch.peer, what)
        ch.consumed += 1
        for done in self.plan.release.get((kind, key), ()):
            for work, _ in self.in_flight.pop(done):
                self._wait(work, ch.peer, f"the completion of sending {self.describe(*done)}")
        self.pump()
        return posted.buffer

    def ready(self, op: Op) -> bool:
        return True  # receives block (up to the timeout)

    def recv(self, op: Op) -> Tensor:
        assert op.message is not None
        return self._recv(op.message.kind, op.message.key)

    def progress(self) -> None:
        self.pump()

    # -- sending ---------------------------------------------------------------------
    def _send(self, kind: Kind, key: Key, x: Tensor) -> None:
        what = self.describe(kind, key)
        check_order(self.plan.send[kind], self.sent_count[kind], key, self.stage, what)
        peer = self.ranks[self.stage + 1 if kind == "act" else self.stage - 1]
        x = x.detach().contiguous()
        rows = self.rows[key[0]][key[1]]
        sends: list[tuple[Any, Tensor]] = []
        try:
            header = agree_shape(
                self.shapes_in, self.shapes_out, kind, key, rows, x, self.stage, what
            )
            if header is not None:
                sends.append((self._isend(header, peer, kind, self._tag(kind, key, True)), header))
            sends.append((self._isend(x, peer, kind, self._tag(kind, key, False)), x))
        except TimeprestError:
            raise
        except Exception as exc:
            raise CommError(peer, f"sending {what}", exc) from exc
        self.in_flight[(kind, key)] = sends
        self.sent_count[kind] += 1

    def send(self, op: Op, tensor: Tensor) -> None:
        assert op.message is not None
        self._send(op.message.kind, op.message.key, tensor)

    # -- end -----------------------------------------------------------------------------
    def finish(self) -> None:
        """Wait for every send still in flight (the pipeline is drained)."""
        for (kind, key), sends in list(self.in_flight.items()):
            peer = self.ranks[self.stage + 1 if kind == "act" else self.stage - 1]
            for work, _ in sends:
                self._wait(work, peer, f"the completion of sending {self.describe(kind, key)}")
        self.in_flight.clear()
        for ch in self.channels.values():
            assert ch.consumed == len(ch.keys) and not ch.posted, "messages left unreceived"

    def abandon(self) -> None:
        """Drop every handle, so that tearing the process group down closes its sockets."""
        self.in_flight.clear()
        for ch in self.channels.values():
            ch.posted.clear()
