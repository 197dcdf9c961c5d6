"""The same-host transport: activations and gradients through shared memory, no extra threads.

Why: on a small CPU machine gloo's point-to-point messages are dear. Its
background thread must wake up to read every message from the socket, on a
core the stages compute on (two wake-ups per message on the receiver), and
its calls took 15-20 % of a rank's active time at small shapes. Here a
message is one copy into a mapped file, one small write to a FIFO, one
``select``/``read`` and one copy out, all on the rank's own thread.

Set-up, once per :class:`~timeprest.engine.runtime.DistributedRuntime` (one
pipeline; every ``train()`` call reuses it): the ranks exchange who they are
over the control group (host, boot id, pid namespace, the directory's
device, pid), pick a per-job directory (``/dev/shm`` when writable, else the
temporary directory), and each rank makes one FIFO per neighbour that sends
to it and opens it read-write (an open that never blocks, and a reader that
never sees end-of-file). After a barrier each opens the FIFOs it writes to;
after a second one each unlinks the FIFOs it made.

A message from rank a to rank b: a copies the payload into a free *slot* of
its link to b (a file ``a-b-N.slot`` mapped on both sides; when no free slot
is large enough a new one is made, so a send never waits for a slot, like
gloo's ``isend``), then writes a 128-byte record to b's FIFO: kind, slot, the
slot's size, the payload's size, the (t, j) key, dtype and shape (a write
of up to ``PIPE_BUF`` bytes to a pipe is atomic; the FIFO holds 8,192
records where the system allows, and a send waits only when b is that far
behind, reading its own incoming records meanwhile). b first reads its
FIFOs in a loop for ``RuntimeOptions.spin`` seconds (2 ms by default where
every rank has cores of its own: on a 2-core virtual machine a write that
woke a receiver asleep in ``poll`` took the sender 57 us, one that did not
9 us, at 1f1b 256/16/8), then waits in ``poll`` on them. It keeps the
records it reads in an inbox per peer, maps a slot the first time it sees
it (and unlinks its file: both sides have it mapped) and copies the payload
into a fresh tensor (autograd keeps received activations).

A slot is free again without any flag or record back: the message plan
(:mod:`.messages`) proves a send complete when a message arrives that its
receiver sends only after consuming ours (the proof the point-to-point
transport uses to drop its send handles), and every ``train()`` call ends
with an all-gather that a rank joins only after consuming all its messages,
so a new call starts with every slot free. The FIFO's system calls order the
receiver's copy before the sender's reuse on any CPU.

Failures: tearing down (:meth:`ShmTransport.abandon`, or the runtime's
teardown) writes a *closed* record to every outgoing FIFO, so a neighbour
waiting in a receive raises a :class:`~.failures.CommError` at once and tears
down in turn (a neighbour that sends to it gets a broken pipe: the writer
opens the FIFO write-only, so a write with no reader left fails). A rank killed outright writes nothing: a waiting receiver
checks every 0.25 s that its peer's process is alive (pid and start time
from the set-up; a zombie counts as dead). Files left behind (a slot its
receiver never mapped) are removed by either side when it closes, at
teardown, garbage collection or interpreter exit, and the directory with them.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from timeprest.engine.runtime.failures import CommError
from timeprest.engine.runtime.layout import Layout
from timeprest.engine.runtime.messages import plan_messages
from timeprest.engine.runtime.p2p import P2PTransport, agree_shape, check_order, describe
from timeprest.engine.runtime.shm_links import ShmLinks, Slot, proc_state, read_text
from timeprest.engine.runtime.wire import Spec
from timeprest.errors import ConfigError, ScheduleError, TimeprestError
from timeprest.schedule.lower import Kind, Lowered, Op

Key = tuple[int, int]


def shm_base() -> str:
    """Where the per-job directory goes: ``/dev/shm`` when writable, else the temp directory."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def _identity(base: str) -> dict[str, Any]:
    """What ranks compare to know they share a host, a pid namespace and the directory."""
    problem = None
    dev: list[int] = []
    try:
        st = os.stat(base)
        dev = [st.st_dev, st.st_ino]
        if not hasattr(os, "mkfifo"):
            problem = "this platform has no named pipes (os.mkfifo)"
        elif not os.access(base, os.W_OK | os.X_OK):
            problem = f"{base} is not writable"
    except OSError as exc:
        problem = f"{base}: {exc}"
    try:  # a sandbox may forbid these: then this rank says why, and every rank decides alike
        state = proc_state(os.getpid())
        pidns = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else ""
    except (OSError, ValueError, IndexError) as exc:
        state, pidns = None, ""
        problem = problem or f"cannot read this process's state in /proc: {exc}"
    return {
        "host": socket.gethostname(),
        "boot": read_text("/proc/sys/kernel/random/boot_id"),
        "pidns": pidns,
        "dir": base,
        "dev": dev,
        "problem": problem,
        "pid": os.getpid(),
        "start": None if state is None else state[1],
    }


def _why_not(got: list[dict[str, Any]], backend: str) -> str | None:
    """Why the shared-memory transport cannot run this job; None when it can."""
    if backend != "gloo":
        return f"the process group's backend is {backend} (shared memory moves CPU tensors: gloo)"
    places = [(g["host"], g["boot"], g["pidns"], g["dir"], tuple(g["dev"])) for g in got]
    if len(set(places)) > 1:
        other = next(r for r, p in enumerate(places) if p != places[0])
        return (
            f"the ranks do not share one host and directory (rank 0 on {got[0]['host']}, "
            f"rank {other} on {got[other]['host']}, {got[other]['dir']})"
        )
    for r, g in enumerate(got):
        if g["problem"] is not None:
            return f"rank {r}: {g['problem']}"
    return None


SPIN = 0.002  # seconds; RuntimeOptions.spin


CPU_MAX = "/sys/fs/cgroup/cpu.max"  # a cgroup v2 quota: "<quota> <period>" or "max ..."


def usable_cores() -> float:
    """The cores this process may use: its CPU affinity, capped by a cgroup (v2) quota
    (``docker --cpus``), which the affinity does not show."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores: float = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    try:
        with open(CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no cgroup v2 quota to read
    return cores


def spin_seconds(asked: float | None, ranks_here: int) -> float:
    """How long a receive spins before it sleeps: ``asked``, or by default :data:`SPIN`
    where each of the ``ranks_here`` ranks on this host can have its intra-op threads on
    cores of their own (:func:`usable_cores`), else 0."""
    if asked is not None:
        return float(asked)
    return SPIN if ranks_here * torch.get_num_threads() <= usable_cores() else 0.0


def open_links(
    transport: str,
    backend: str,
    layout: Layout,
    instance: int,
    gather: Callable[[Any, str], list[Any]],
    agreed: Callable[[str, Callable[[], None]], None],
    spin: float | None = None,
) -> ShmLinks | None:
    """Set up the shared-memory channels of this rank, or None for the process group.

    Collective over the control group (``gather``, ``agreed``): every rank calls
    it, once per pipeline, and all reach the same decision. ``spin``: as
    ``RuntimeOptions.spin`` (None: :func:`spin_seconds` decides).
    """
    ranks, s = layout.pipeline_ranks(), layout.stage
    peers = [ranks[i] for i in (s - 1, s + 1) if 0 <= i < len(ranks)]
    base = shm_base()
    mine = {"transport": transport, "token": uuid.uuid4().hex[:12], **_identity(base)}
    got = gather(mine, "the transport agreement")
    asked = [g["transport"] for g in got]
    if len(set(asked)) > 1:
        raise ConfigError(
            "the ranks ask for different transports: "
            + ", ".join(f"rank {r} {a!r}" for r, a in enumerate(asked))
        )
    reason = _why_not(got, backend)
    if transport == "process-group" or (transport == "auto" and reason is not None):
        return None
    if reason is not None:
        raise ConfigError(f"transport='shm' cannot run here: {reason}")
    directory = os.path.join(got[0]["dir"], f"timeprest-{got[0]['token']}-{instance}")
    links = ShmLinks(directory, layout.rank, peers, got, spin_seconds(spin, len(got)))
    try:
        agreed("making the shared-memory channels", links.make_fifos)
        agreed("opening the shared-memory channels", links.connect)
        links.unlink_fifos()
    except BaseException:
        links.close(notify=False)
        raise
    return links


@dataclass
class _Incoming:
    peer: int
    keys: list[Key]
    consumed: int = 0


class ShmTransport:
    """The :class:`~timeprest.engine.executor.Transport` of one rank over :class:`ShmLinks`.

    The same interface, checks and messages as
    :class:`~timeprest.engine.runtime.p2p.P2PTransport`; one per ``train()`` call.
    """

    def __init__(
        self,
        lowered: Lowered,
        stage: int,
        micro_rows: list[list[int]],
        shapes_in: dict[int, Spec],
        shapes_out: dict[int, Spec],
        *,
        links: ShmLinks,
        timeout: float,
        ranks: Sequence[int],
    ) -> None:
        self.stage = stage
        self.ranks = list(ranks)
        self.backward_unit = lowered.schedule.backward_unit
        self.plan = plan_messages(lowered, stage)
        self.rows = micro_rows
        self.shapes_in = shapes_in
        self.shapes_out = shapes_out
        self.links = links
        self.timeout = timeout
        self.channels: dict[Kind, _Incoming] = {}
        if stage > 0:
            self.channels["act"] = _Incoming(self.ranks[stage - 1], self.plan.recv["act"])
        if stage < lowered.schedule.num_stages - 1:
            self.channels["grad"] = _Incoming(self.ranks[stage + 1], self.plan.recv["grad"])
        self.sent_count: dict[Kind, int] = {"act": 0, "grad": 0}
        self.in_flight: dict[tuple[Kind, Key], Slot] = {}
        links.free_all()  # the last call's messages were all consumed before its end

    def describe(self, kind: Kind, key: Key) -> str:
        return describe(kind, key, self.backward_unit)

    def pump(self) -> None:
        """Nothing to post ahead: records wait in the FIFO until asked for."""

    def ready(self, op: Op) -> bool:
        return True  # receives block (up to the timeout)

    @property
    def waited(self) -> float:
        return self.links.waited

    def progress(self) -> None:
        pass

    def recv(self, op: Op) -> Tensor:
        assert op.message is not None
        kind, key = op.message.kind, op.message.key
        ch = self.channels[kind]
        what = self.describe(kind, key)
        check_order(ch.keys, ch.consumed, key, self.stage, what, "asked for")
        try:
            x, spec = self.links.take(ch.peer, key, what, self.timeout)
        except (TimeprestError, CommError):
            raise
        except Exception as exc:
            raise CommError(ch.peer, what, exc) from exc
        if kind == "act":
            self.shapes_in.setdefault(self.rows[key[0]][key[1]], spec)
        ch.consumed += 1
        for done in self.plan.release.get((kind, key), ()):
            self.in_flight.pop(done).busy = False  # the peer consumed it before sending this
        return x

    def send(self, op: Op, tensor: Tensor) -> None:
        assert op.message is not None
        kind, key = op.message.kind, op.message.key
        what = self.describe(kind, key)
        check_order(self.plan.send[kind], self.sent_count[kind], key, self.stage, what)
        peer = self.ranks[self.stage + 1 if kind == "act" else self.stage - 1]
        x = tensor.detach().contiguous()
        rows = self.rows[key[0]][key[1]]
        try:
            # checks the dtype and dims too: a new size's are encoded, later ones must match
            agree_shape(self.shapes_in, self.shapes_out, kind, key, rows, x, self.stage, what)
            slot = self.links.post(peer, kind, key, x, f"sending {what}", self.timeout)
            self.in_flight[(kind, key)] = slot
        except (TimeprestError, CommError):
            raise
        except Exception as exc:
            raise CommError(peer, f"sending {what}", exc) from exc
        self.sent_count[kind] += 1

    def finish(self) -> None:
        """Check that every message was received (sends complete as they are written)."""
        for ch in self.channels.values():
            if ch.consumed != len(ch.keys):
                raise ScheduleError(f"internal: stage {self.stage} left messages unreceived")

    def abandon(self) -> None:
        """Tell the neighbours this rank stopped, and release the channels."""
        self.links.close(notify=True)


def make_transport(
    links: ShmLinks | None,
    *args: Any,
    timeout: float,
    ranks: Sequence[int],
    **process_group: Any,
) -> P2PTransport | ShmTransport:
    """The transport of one ``train()`` call: over ``links`` when set, else the process group.

    ``args``: the transports' common positional arguments (lowered programs, stage,
    micro-batch rows, shape tables); ``process_group``: P2PTransport's own options.
    """
    if links is not None:
        return ShmTransport(*args, links=links, timeout=timeout, ranks=ranks)
    return P2PTransport(*args, timeout=timeout, ranks=ranks, **process_group)


__all__ = ["ShmLinks", "ShmTransport", "make_transport", "open_links", "shm_base"]
