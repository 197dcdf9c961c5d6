"""The distributed runtime: one process per stage over ``torch.distributed``.

Rank ``r`` runs stage ``r``: the same per-stage program and the same
:class:`~timeprest.stage.StageRunner` code as the emulator; only the
transport differs (point-to-point ``isend``/``irecv`` instead of a
dictionary), so the results are bitwise those of the emulator on CPU.

Launch (see ``docs/runtime.md``)::

    # one node, 4 processes (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 4 -m timeprest train --engine distributed ...
    # the same, torchrun started for you on loopback
    timeprest train --engine distributed --nproc 4 ...
    # two nodes of 2 processes each
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m timeprest train --engine distributed ...

In a script::

    pipe = timeprest.Pipeline(stage_fn, method="v-timeprest", num_microbatches=4,
                              optimizer=..., loss_fn=..., engine="distributed")
    losses = pipe.train(batches)   # same list on every rank

How messages flow. Every rank derives from the schedule (through
:func:`timeprest.schedule.deps`) the ordered list of messages it receives
and sends on each channel (activations from stage s-1, gradients from s+1).
Receives are posted ahead (``lookahead`` per channel) into buffers of the
agreed shape; sends are asynchronous, and their handles are kept until the
schedule proves them complete: a send to peer p is done once we have
received a message that p sends only after consuming ours. Shapes are
agreed once per micro-batch size: the first activation of each size is
preceded by a small header (dtype and shape); later ones must match it.

Failures. Any exception on a rank (a user error, a non-finite loss, a
shape mismatch) is written to the process group's store under
``fail/<rank>``, the rank tears its process groups down (its sockets close)
and re-raises. A neighbour blocked on that rank sees the connection close,
reads the store, names the failed rank, stage and action in a
:class:`StageFailure`, and tears down too, so the failure cascades through
the pipeline in milliseconds. A rank killed outright leaves no record: its
neighbours report it by the message they were waiting for. Nothing waits
longer than ``RuntimeOptions.timeout``.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import hashlib
import json
import os
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from timeprest.errors import ConfigError, DataError, ScheduleError, ShapeError, TimeprestError
from timeprest.report import MinibatchReport, StageReport, StageStep
from timeprest.schedule.builders import Schedule
from timeprest.stage import SplitBatches, StageRunner

if TYPE_CHECKING:
    from timeprest.pipeline import Pipeline

T = TypeVar("T")
Key = tuple[int, int]  # (minibatch, microbatch) within one train() call
Kind = Literal["act", "grad"]  # activation to stage s+1, gradient to stage s-1

StageSpec = Sequence[nn.Module | None] | Callable[[int], nn.Module]


class StageFailure(TimeprestError):
    """Another rank of the distributed pipeline failed, so this rank stopped too."""


@dataclass(frozen=True)
class RuntimeOptions:
    """Settings of the distributed runtime (they need not be equal across ranks)."""

    timeout: float = 120.0
    """Seconds a rank waits for any message or collective before it gives up; also the
    process-group timeout when the runtime initialises the group itself."""
    num_threads: int | None = 1
    """Intra-op threads per process on CPU (``torch.set_num_threads``); None keeps torch's."""
    lookahead: int | None = None
    """Receives posted ahead per incoming channel; None means ``num_microbatches + 1``."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Backend when the runtime initialises the process group from torchrun's environment:
    ``auto`` picks NCCL when CUDA is available, else gloo."""

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"runtime timeout must be > 0 seconds, got {self.timeout!r}")
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise ConfigError(
                f"num_threads must be an integer >= 1 or None, got {self.num_threads!r}"
            )
        if self.lookahead is not None and (
            not isinstance(self.lookahead, int) or self.lookahead < 1
        ):
            raise ConfigError(f"lookahead must be an integer >= 1 or None, got {self.lookahead!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"unknown backend {self.backend!r}: expected auto, gloo or nccl")


# -- the process group -----------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def in_distributed_job() -> bool:
    """True inside torchrun's workers (or wherever a default process group exists)."""
    if dist.is_available() and dist.is_initialized():
        return True
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(options: RuntimeOptions | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment unless one exists.

    Returns this process's rank, the world size and its device (``cuda:LOCAL_RANK``
    with NCCL, else CPU), and applies ``options.num_threads`` on CPU. Call it early
    (before loading data) to learn which stage this process runs.
    """
    opts = options or RuntimeOptions()
    if not dist.is_available():
        raise ConfigError("engine='distributed' needs a PyTorch build with torch.distributed")
    if not dist.is_initialized():
        if not in_distributed_job():
            raise ConfigError(
                "engine='distributed' runs one process per stage: start it with "
                "`torchrun --nproc-per-node W ...`, `timeprest train --engine distributed "
                "--nproc W`, or call torch.distributed.init_process_group first"
            )
        chosen = opts.backend
        if chosen == "auto":
            chosen = "nccl" if torch.cuda.is_available() else "gloo"
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=opts.timeout))
        global _owned_world
        _owned_world = weakref.ref(dist.group.WORLD)
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", str(dist.get_rank())))
    if backend == "nccl":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if opts.num_threads is not None:
            torch.set_num_threads(opts.num_threads)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


# One gloo group for control messages (checks, losses, reports), created once per
# default group: collectives on it never interleave with the stage-to-stage traffic,
# and it works whatever the data backend is.
# The default group is held by weak reference only: the runtime never keeps a
# process group alive past the job's own ``destroy_process_group``.
_control: tuple[weakref.ref[Any], Any] | None = None
_instances = 0  # runtimes created in this process; equal across ranks in a correct program
_runtimes: weakref.WeakSet[DistributedRuntime] = weakref.WeakSet()
_owned_world: weakref.ref[Any] | None = None  # the default group init_distributed created
_SHUT_DOWN = "shut down"


def _control_group(timeout: float) -> Any:
    global _control
    world = dist.group.WORLD
    if _control is None or _control[0]() is not world:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        _control = (weakref.ref(world), group)
        # shut the runtime down at exit, once however many groups a process makes
        atexit.unregister(shutdown)
        atexit.register(shutdown)
    return _control[1]


def shutdown() -> None:
    """End this process's part of the distributed job cleanly; safe to call twice.

    Drops the runtime's references to its process groups, so that each group is
    destroyed (and its worker threads joined) while the interpreter is still fully
    alive, and destroys the default group if :func:`init_distributed` created it.
    Pipelines of this process cannot communicate afterwards. It runs by itself at
    interpreter exit once a runtime was created: a gloo worker thread still releasing the tensors of the last
    collective when the interpreter finalises aborts the process (SIGABRT).
    """
    global _control, _owned_world
    for rt in list(_runtimes):
        if rt.broken is None:
            rt.broken = _SHUT_DOWN
        rt.group = None
    _control = None
    owned = _owned_world() if _owned_world is not None else None
    _owned_world = None
    try:
        if owned is not None and dist.is_initialized() and dist.group.WORLD is owned:
            dist.destroy_process_group()
    except Exception:  # already torn down by a failure
        pass
    del owned
    gc.collect()
    # a group the caller keeps (not destroyed) still has its workers: let one that
    # waits for the GIL to release a finished collective's tensors have it now
    time.sleep(0.01)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _stage_name(rank: int) -> str:
    return f"rank {rank} (stage {rank})"


class _CommError(Exception):
    """A wait or collective failed: a peer closed its connection or timed out."""

    def __init__(self, peer: int | None, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: {_first_line(cause)}")
        self.peer = peer
        self.what = what
        self.cause = cause


# -- shapes ------------------------------------------------------------------------

_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_MAX_DIMS = 8
_HEADER = 2 + _MAX_DIMS  # dtype code, number of dims, dims

Spec = tuple[tuple[int, ...], torch.dtype]


def _encode(x: Tensor, sender: int, key: Key) -> Tensor:
    if x.dtype not in _DTYPES or x.dim() > _MAX_DIMS:
        raise ShapeError(
            f"stage {sender} returned a tensor of dtype {x.dtype} with {x.dim()} dims for "
            f"micro-batch {key[0]}.{key[1]}; the runtime sends up to {_MAX_DIMS} dims of "
            f"{', '.join(str(d).removeprefix('torch.') for d in _DTYPES)}"
        )
    h = [_DTYPES.index(x.dtype), x.dim(), *x.shape] + [0] * (_MAX_DIMS - x.dim())
    return torch.tensor(h, dtype=torch.int64, device=x.device)


def _decode(h: Tensor) -> Spec:
    v = [int(a) for a in h.cpu().tolist()]
    return tuple(v[2 : 2 + v[1]]), _DTYPES[v[0]]


def microbatch_rows(rows: int, n: int) -> list[int]:
    """Rows of each micro-batch of a mini-batch of ``rows`` rows (``torch.tensor_split``)."""
    return [rows // n + (1 if j < rows % n else 0) for j in range(n)]


# -- the message plan ----------------------------------------------------------------

Event = tuple[Literal["send", "recv"], int, Kind, Key]  # op, peer, kind, key


def stage_events(schedule: Schedule, stage: int) -> list[Event]:
    """Messages ``stage`` receives and sends, in the order its program makes them.

    Which messages exist comes from :func:`~timeprest.schedule.deps`: an action
    receives from each other stage it depends on, and sends to each neighbour
    whose same action depends on it. Within an action the order is the one
    :class:`StageRunner` uses: per micro-batch, receive then send.
    """
    w, n = schedule.num_stages, schedule.num_microbatches
    out: list[Event] = []
    for a in schedule.programs[stage]:
        if a.kind == "U":
            continue
        sources = sorted({p for p, _ in schedule.deps(stage, a) if p != stage})
        targets = [
            q for q in (stage - 1, stage + 1) if 0 <= q < w and (stage, a) in schedule.deps(q, a)
        ]
        for j in a.microbatches(n):
            key = (a.minibatch, j)
            for p in sources:
                out.append(("recv", p, "act" if p < stage else "grad", key))
            for q in targets:
                out.append(("send", q, "act" if q > stage else "grad", key))
    return out


@dataclass
class MessagePlan:
    """What one stage's transport needs to know about its traffic."""

    recv: dict[Kind, list[Key]]  # per channel, in consumption order
    send: dict[Kind, list[Key]]  # per channel, in issue order
    # sends proved complete once this receive has completed (the peer sent the
    # received message only after consuming ours)
    release: dict[tuple[Kind, Key], list[tuple[Kind, Key]]]
    # sends to the same peer that precede this receive in program order (NCCL
    # matches point-to-point operations per pair in issue order)
    sends_before: dict[tuple[Kind, Key], int]


def plan_messages(schedule: Schedule, stage: int) -> MessagePlan:
    """The message plan of ``stage``; checks that neighbours agree on every channel's order."""
    w = schedule.num_stages
    mine = stage_events(schedule, stage)
    recv: dict[Kind, list[Key]] = {"act": [], "grad": []}
    send: dict[Kind, list[Key]] = {"act": [], "grad": []}
    sends_before: dict[tuple[Kind, Key], int] = {}
    sent_to: dict[int, int] = {}
    for op, peer, kind, key in mine:
        if op == "recv":
            recv[kind].append(key)
            sends_before[(kind, key)] = sent_to.get(peer, 0)
        else:
            send[kind].append(key)
            sent_to[peer] = sent_to.get(peer, 0) + 1
    release: dict[tuple[Kind, Key], list[tuple[Kind, Key]]] = {}
    for peer in (stage - 1, stage + 1):
        if not 0 <= peer < w:
            continue
        theirs = stage_events(schedule, peer)
        out_kind: Kind = "act" if peer > stage else "grad"
        back_kind: Kind = "grad" if peer > stage else "act"
        their_recv = [k for op, p, kd, k in theirs if op == "recv" and p == stage]
        their_send = [k for op, p, kd, k in theirs if op == "send" and p == stage]
        if their_recv != send[out_kind] or their_send != recv[back_kind]:
            raise ScheduleError(
                f"internal: stages {stage} and {peer} disagree on the order of their messages"
            )
        pending: list[Key] = []
        for op, p, _kind, key in theirs:
            if p != stage:
                continue
            if op == "recv":
                pending.append(key)
            elif pending:
                release[(back_kind, key)] = [(out_kind, k) for k in pending]
                pending = []
    return MessagePlan(recv, send, release, sends_before)


# -- the transport ---------------------------------------------------------------------


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
    """The :class:`~timeprest.stage.Transport` of one rank over point-to-point messages.

    ``shapes_in[rows]`` / ``shapes_out[rows]``: the (shape, dtype) of the activation
    of a micro-batch of ``rows`` rows into and out of this stage, as agreed by the
    headers (the gradients have the shape of the activation they belong to). They
    outlive one ``train()`` call, so the caller owns them.
    """

    def __init__(
        self,
        schedule: Schedule,
        stage: int,
        micro_rows: list[list[int]],
        shapes_in: dict[int, Spec],
        shapes_out: dict[int, Spec],
        *,
        device: torch.device,
        timeout: float,
        lookahead: int,
        ordered: bool,
    ) -> None:
        self.stage = stage
        self.num_microbatches = schedule.num_microbatches
        self.backward_unit = schedule.backward_unit
        self.plan = plan_messages(schedule, stage)
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
            self.channels["act"] = _Channel("act", stage - 1, self.plan.recv["act"])
        if stage < schedule.num_stages - 1:
            self.channels["grad"] = _Channel("grad", stage + 1, self.plan.recv["grad"])
        self.sent_count: dict[Kind, int] = {"act": 0, "grad": 0}
        # handles (and tensors, which must stay alive) of sends not yet known complete
        self.in_flight: dict[tuple[Kind, Key], list[tuple[Any, Tensor]]] = {}

    # -- naming, for messages ------------------------------------------------------
    def describe(self, kind: Kind, key: Key) -> str:
        t, j = key
        if kind == "act":
            return f"the activation of F{t}.{j}"
        action = f"B{t}" if self.backward_unit == "minibatch" else f"B{t}.{j}"
        return f"the gradient of {action} (micro-batch {t}.{j})"

    def _tag(self, kind: Kind, key: Key, header: bool) -> int:
        t, j = key
        return ((t * self.num_microbatches + j) * 4 + 2 * header + (kind == "grad")) % 2**31

    def _wait(self, work: Any, peer: int, what: str) -> None:
        try:
            if self.ordered:
                # NCCL: the wait only orders the compute stream after the transfer (a
                # timeout would block the CPU); the NCCL watchdog enforces the timeout
                work.wait()
            else:
                work.wait(self.timeout)
        except Exception as exc:
            raise _CommError(peer, what, exc) from exc

    def _irecv(self, buf: Tensor, peer: int, tag: int, what: str) -> Any:
        try:
            return dist.irecv(buf, peer, tag=tag)
        except Exception as exc:
            raise _CommError(peer, what, exc) from exc

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
            buf = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            work = self._irecv(buf, ch.peer, self._tag(ch.kind, key, True), what)
            ch.posted[key] = _Posted(work, buf, header=True)
            ch.header_pending = True
        else:
            buf = torch.empty(spec[0], dtype=spec[1], device=self.device)
            work = self._irecv(buf, ch.peer, self._tag(ch.kind, key, False), what)
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
        if ch.consumed >= len(ch.keys) or ch.keys[ch.consumed] != key:
            raise ScheduleError(f"internal: stage {self.stage} asked for {what} out of order")
        while key not in ch.posted:
            if ch.header_pending or not self._post_one(ch):
                raise ScheduleError(f"internal: stage {self.stage} cannot post {what}")
        posted = ch.posted.pop(key)
        if posted.header:
            self._wait(posted.work, ch.peer, what)
            spec = _decode(posted.buffer)
            self.shapes_in[self.rows[key[0]][key[1]]] = spec
            ch.header_pending = False
            buf = torch.empty(spec[0], dtype=spec[1], device=self.device)
            posted = _Posted(
                self._irecv(buf, ch.peer, self._tag(kind, key, False), what), buf, header=False
            )
        self._wait(posted.work, ch.peer, what)
        ch.consumed += 1
        for done in self.plan.release.get((kind, key), ()):
            for work, _ in self.in_flight.pop(done):
                self._wait(work, ch.peer, f"the completion of sending {self.describe(*done)}")
        self.pump()
        return posted.buffer

    def recv_activation(self, stage: int, t: int, j: int) -> Tensor:
        return self._recv("act", (t, j))

    def recv_grad(self, stage: int, t: int, j: int) -> Tensor:
        return self._recv("grad", (t, j))

    # -- sending ---------------------------------------------------------------------
    def _send(self, kind: Kind, key: Key, x: Tensor) -> None:
        seq = self.plan.send[kind]
        n = self.sent_count[kind]
        what = self.describe(kind, key)
        if n >= len(seq) or seq[n] != key:
            raise ScheduleError(f"internal: stage {self.stage} sends {what} out of order")
        peer = self.stage + 1 if kind == "act" else self.stage - 1
        x = x.detach().contiguous()
        rows = self.rows[key[0]][key[1]]
        # an activation must match what we announced for this size; a gradient, the
        # activation it belongs to (what we received)
        table = self.shapes_out if kind == "act" else self.shapes_in
        spec = table.get(rows)
        sends: list[tuple[Any, Tensor]] = []
        try:
            if spec is None:
                if kind == "grad":
                    raise ScheduleError(
                        f"internal: stage {self.stage} sends {what} before receiving its input"
                    )
                header = _encode(x, self.stage, key)
                table[rows] = (tuple(x.shape), x.dtype)
                sends.append((dist.isend(header, peer, tag=self._tag(kind, key, True)), header))
            elif spec != (tuple(x.shape), x.dtype):
                name = "output" if kind == "act" else "input gradient"
                raise ShapeError(
                    f"stage {self.stage}'s {name} for micro-batch {key[0]}.{key[1]} ({rows} rows) "
                    f"has shape {tuple(x.shape)} and dtype {x.dtype}, but the first micro-batch "
                    f"of {rows} rows had shape {spec[0]} and dtype {spec[1]}: the distributed "
                    "runtime needs one output shape per micro-batch size"
                )
            sends.append((dist.isend(x, peer, tag=self._tag(kind, key, False)), x))
        except TimeprestError:
            raise
        except Exception as exc:
            raise _CommError(peer, f"sending {what}", exc) from exc
        self.in_flight[(kind, key)] = sends
        self.sent_count[kind] += 1

    def send_activation(self, stage: int, t: int, j: int, x: Tensor) -> None:
        self._send("act", (t, j), x)

    def send_grad(self, stage: int, t: int, j: int, g: Tensor) -> None:
        self._send("grad", (t, j), g)

    # -- end -----------------------------------------------------------------------------
    def finish(self) -> None:
        """Wait for every send still in flight (the pipeline is drained)."""
        for (kind, key), sends in list(self.in_flight.items()):
            peer = self.stage + 1 if kind == "act" else self.stage - 1
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


class _NoBatches:
    """Middle stages read no data."""

    def input(self, t: int, j: int) -> Tensor:
        raise AssertionError("a middle stage read an input")

    def target(self, t: int, j: int) -> Tensor:
        raise AssertionError("a middle stage read a target")

    def fraction(self, t: int, j: int) -> float:
        raise AssertionError("a middle stage read a loss fraction")


# -- the runtime ------------------------------------------------------------------------


def fingerprint(values: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able dictionary."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DistributedRuntime:
    """The per-process side of ``Pipeline(engine="distributed")``.

    Constructing it is collective: every rank must create its pipelines in
    the same order.
    """

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        global _instances
        self.options = options or RuntimeOptions()
        self.info = init_distributed(self.options)
        self.rank = self.info.rank
        self.world_size = self.info.world_size
        self.group: Any = _control_group(self.options.timeout)
        _runtimes.add(self)
        _instances += 1
        self.instance = _instances
        store = dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"timeprest/{self.instance}/", store)
        self.broken: str | None = None
        # activation (shape, dtype) per micro-batch size into and out of this stage,
        # agreed by headers and kept for the pipeline's life
        self.shapes_in: dict[int, Spec] = {}
        self.shapes_out: dict[int, Spec] = {}
        self._transport: P2PTransport | None = None

    # -- agreement -----------------------------------------------------------------
    def _all_gather(self, obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:
            raise _CommError(None, what, exc) from exc
        return out

    def agreed(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` here; if it raises on any rank, raise on every rank.

        The failing rank re-raises its own exception, the others a
        :class:`~timeprest.errors.ConfigError` that names it.
        """
        self._check_usable()
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except Exception as exc:
            error = exc
        try:
            errors = self._all_gather(None if error is None else _first_line(error), what)
        except _CommError as exc:
            self._fail(exc, what)
        if error is not None:
            raise error
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            raise ConfigError(
                f"{what} failed on " + "; ".join(f"{_stage_name(r)}: {e}" for r, e in bad)
            )
        return result  # type: ignore[return-value]

    def barrier(self, what: str) -> None:
        self.agreed(what, lambda: None)

    def local_stages(self, stages: StageSpec, num_stages: int | None) -> list[nn.Module | None]:
        """The stage list of this rank: its own module built, the other slots None."""

        def build() -> list[nn.Module | None]:
            if isinstance(stages, nn.Module):
                raise ConfigError(
                    "stages must be a list of nn.Module or a callable stage_fn(stage) -> "
                    "nn.Module (use timeprest.split(model, num_stages) to cut a model)"
                )
            if callable(stages):
                w = num_stages if num_stages is not None else self.world_size
            elif isinstance(stages, Sequence):
                w = len(stages)
                if num_stages is not None and num_stages != w:
                    raise ConfigError(f"num_stages={num_stages} but {w} stages were given")
            else:
                raise ConfigError("stages must be a list of nn.Module or a callable stage_fn")
            if w != self.world_size:
                raise ConfigError(
                    f"engine='distributed' runs one stage per process: the pipeline has {w} "
                    f"stages but WORLD_SIZE is {self.world_size}; launch "
                    f"`torchrun --nproc-per-node {w}` (or give {self.world_size} stages)"
                )
            module = stages(self.rank) if callable(stages) else stages[self.rank]
            if not isinstance(module, nn.Module):
                raise ConfigError(
                    f"stage {self.rank} is a {type(module).__name__}, not an nn.Module "
                    f"(rank {self.rank} runs stage {self.rank})"
                )
            device = self.info.device
            if device.type == "cuda":
                module.to(device)
            else:
                for p in [*module.parameters(), *module.buffers()]:
                    if p.device.type != "cpu":
                        raise ConfigError(
                            f"stage {self.rank} has tensors on {p.device}, but the process "
                            f"group's backend is {self.info.backend}: use NCCL for GPUs"
                        )
            out: list[nn.Module | None] = [None] * w
            out[self.rank] = module
            return out

        # a rank that cannot build its stage must not leave the others waiting
        return self.agreed("building the stages", build)

    # -- failure -------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.broken == _SHUT_DOWN:
            raise StageFailure(
                "this distributed pipeline's job was shut down "
                "(timeprest.engine.runtime.shutdown); start a new job"
            )
        if self.broken is not None:
            raise StageFailure(
                f"this distributed pipeline stopped after a failure ({self.broken}); "
                "start a new job"
            )

    def _read_records(self) -> dict[int, dict[str, Any]]:
        records: dict[int, dict[str, Any]] = {}
        for r in range(self.world_size):
            try:
                if self.store.check([f"fail/{r}"]):
                    records[r] = json.loads(self.store.get(f"fail/{r}").decode())
            except Exception:  # the store may be gone with its host
                continue
        return records

    def _diagnose(self, mine: dict[str, Any]) -> str:
        """Name the rank that failed first, from the records in the store."""
        records = self._read_records()
        records[self.rank] = mine
        raised = sorted(
            (r for r in records.values() if r["kind"] == "raised"), key=lambda r: r["time"]
        )
        if raised:
            first = raised[0]
            return f"{_stage_name(first['rank'])} failed at {first['where']}: {first['error']}"
        # follow who waited on whom to a rank that left no record
        link = mine
        seen = {self.rank}
        while link.get("peer") is not None:
            peer = int(link["peer"])
            if peer in records and peer not in seen and records[peer]["kind"] == "lost":
                seen.add(peer)
                link = records[peer]
                continue
            if peer in records:
                break
            return (
                f"{_stage_name(peer)} stopped without reporting an error (killed, or crashed "
                f"outside Python) before it sent {link['what']}; {_stage_name(link['rank'])} "
                f"was waiting for it at {link['where']} ({link['detail']})"
            )
        return (
            f"{_stage_name(link['rank'])} lost contact at {link['where']} while waiting for "
            f"{link['what']}: {link['detail']}"
        )

    def _teardown(self) -> None:
        global _control
        if self._transport is not None:
            self._transport.abandon()
        _control = None
        try:
            if dist.is_initialized():
                if self.info.backend == "nccl":
                    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
                    if abort is not None:
                        abort()
                        return
                dist.destroy_process_group()  # every group: closes this rank's sockets
        except Exception:
            pass

    def _fail(self, exc: BaseException, where: str) -> NoReturn:
        """Record the failure, tear the process groups down and raise on this rank."""
        if isinstance(exc, _CommError):
            record: dict[str, Any] = {
                "kind": "lost",
                "peer": exc.peer,
                "what": exc.what,
                "detail": _first_line(exc.cause),
            }
        else:
            record = {"kind": "raised", "error": _first_line(exc)}
        record.update(rank=self.rank, where=where, time=time.time())
        try:
            self.store.set(f"fail/{self.rank}", json.dumps(record))
        except Exception:
            pass
        message = (
            self._diagnose(record)
            if isinstance(exc, _CommError)
            else (f"{_stage_name(self.rank)} failed at {where}: {record['error']}")
        )
        self.broken = message
        self._teardown()
        print(f"[timeprest {_stage_name(self.rank)}] {message}", file=sys.stderr, flush=True)
        if isinstance(exc, _CommError):
            raise StageFailure(message) from None
        raise exc

    # -- training ------------------------------------------------------------------------
    def _config(self, pipe: Pipeline, runner: StageRunner) -> dict[str, Any]:
        import timeprest

        c = pipe.costs
        return {
            **pipe.describe(),
            "costs_values": [c.forward, c.backward, c.update, c.comm, c.paper],
            "pipeline_instance": self.instance,
            "minibatches_done": pipe.minibatches_done,
            "updates": runner.store.latest,
            "timeprest": timeprest.__version__,
            "torch": torch.__version__,
        }

    def _startup(
        self,
        pipe: Pipeline,
        runner: StageRunner,
        data: list[tuple[Tensor, Tensor]] | None,
        error: BaseException | None,
    ) -> list[int]:
        """Agree on the batches and the configuration; raise the same error on every rank."""
        w = self.world_size
        rows = None if data is None else [int(x.shape[0]) for x, _ in data]
        config = self._config(pipe, runner)
        mine = {
            "error": None if error is None else _first_line(error),
            "rows": rows,
            "config": config,
            "hash": fingerprint(config),
        }
        try:
            got = self._all_gather(mine, "the start-up exchange")
        except _CommError as exc:
            self._fail(exc, "the start-up exchange")
        if error is not None:
            raise error
        bad = [(r, g["error"]) for r, g in enumerate(got) if g["error"] is not None]
        if bad:
            raise ConfigError(
                "the batches were rejected on "
                + "; ".join(f"{_stage_name(r)}: {e}" for r, e in bad)
            )
        if len({g["hash"] for g in got}) > 1:
            diffs = []
            for name in config:
                values = [g["config"].get(name) for g in got]
                if any(v != values[0] for v in values):
                    diffs.append(
                        f"{name}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values))
                    )
            raise ConfigError(
                "the ranks run different configurations (every rank must build the same "
                "Pipeline, in the same order, from the same checkpoint): " + "; ".join(diffs)
            )
        first, last = got[0]["rows"], got[w - 1]["rows"]
        if first != last:
            raise DataError(
                f"stage 0 and stage {w - 1} read different batches: stage 0 got "
                f"{len(first)} mini-batches of {first[:8]}{'...' if len(first) > 8 else ''} rows, "
                f"stage {w - 1} got {len(last)} of {last[:8]}{'...' if len(last) > 8 else ''}"
            )
        return list(first)

    def _check_schedule(self, schedule: Schedule) -> None:
        text = fingerprint({"programs": schedule.to_text(), "kind": schedule.kind})
        try:
            got = self._all_gather(text, "the schedule check")
        except _CommError as exc:
            self._fail(exc, "the schedule check")
        if len(set(got)) > 1:
            raise ScheduleError(
                "the ranks built different schedules: "
                + ", ".join(f"rank {r} {h}" for r, h in enumerate(got))
            )

    def train(
        self,
        pipe: Pipeline,
        batches: Any,
        on_loss: Callable[[int, float], None] | None,
    ) -> list[float]:
        """``Pipeline.train`` for this rank's stage; returns every mini-batch's loss on every rank."""
        self._check_usable()
        runner = pipe.runners[0]
        w, rank = self.world_size, self.rank
        data: list[tuple[Tensor, Tensor]] | None = None
        error: BaseException | None = None
        if rank in (0, w - 1):  # only the first and the last stage read data
            try:
                data = pipe._check_batches(batches)
            except Exception as exc:
                error = exc
        rows = self._startup(pipe, runner, data, error)
        if not rows:
            return []
        where = "building the schedule"
        try:
            schedule, plans = pipe._schedule_and_plan(len(rows))
        except Exception as exc:
            self._fail(exc, where)
        self._check_schedule(schedule)
        n = pipe.num_microbatches
        micro = [microbatch_rows(r, n) for r in rows]
        source = SplitBatches(data, n) if data is not None else _NoBatches()
        runner.begin(plans[rank], pipe.minibatches_done)
        if rank == w - 1:
            runner.on_loss = on_loss
        lookahead = self.options.lookahead or n + 1
        where = "start-up"
        try:
            transport = P2PTransport(
                schedule,
                rank,
                micro,
                self.shapes_in,
                self.shapes_out,
                device=runner.device,
                timeout=self.options.timeout,
                lookahead=lookahead,
                ordered=self.info.backend == "nccl",
            )
            self._transport = transport
            transport.pump()
            for i, action in enumerate(schedule.programs[rank]):
                where = f"action {action} (program index {i} of stage {rank})"
                runner.run(i, action, transport, source)
                transport.pump()
            where = "the end of the run (waiting for the last sends)"
            transport.finish()
        except BaseException as exc:
            self._fail(exc, where)
        finally:
            runner.on_loss = None
            self._transport = None
        return self._finish(pipe, runner, len(rows), on_loss)

    def _finish(
        self,
        pipe: Pipeline,
        runner: StageRunner,
        count: int,
        on_loss: Callable[[int, float], None] | None,
    ) -> list[float]:
        """Share losses and report figures, so every rank returns and reports the same."""
        pipe._refresh_stage_reports()
        mine = {
            "losses": runner.losses if runner.is_last else None,
            "steps": runner.steps,
            "stage": pipe.report.stages[self.rank],
        }
        where = "the end-of-run exchange"
        try:
            got = self._all_gather(mine, where)
        except _CommError as exc:
            self._fail(exc, where)
        losses_by_t: dict[int, float] = got[-1]["losses"]
        losses = [losses_by_t[t] for t in range(count)]
        for s, g in enumerate(got):
            stage_report: StageReport = g["stage"]
            pipe.report.stages[s] = stage_report
        base = pipe.minibatches_done
        for t in range(count):
            pipe.report.minibatches.append(
                MinibatchReport(base + t, losses[t], [g["steps"].get(t, StageStep()) for g in got])
            )
        if on_loss is not None and not runner.is_last:
            for t in range(count):
                on_loss(base + t, losses[t])
        pipe.minibatches_done += count
        return losses


__all__ = [
    "DistInfo",
    "DistributedRuntime",
    "MessagePlan",
    "P2PTransport",
    "RuntimeOptions",
    "StageFailure",
    "in_distributed_job",
    "init_distributed",
    "microbatch_rows",
    "plan_messages",
    "stage_events",
]
