"""The shared-memory channels of one rank to its pipeline neighbours (see :mod:`.shm`).

Per directed pair of neighbours: a FIFO that carries fixed-size records (the
doorbell) and the slot files that carry payloads. Kept apart from the
transport so that the mechanism (files, records, liveness) reads on its own.
"""

from __future__ import annotations

import fcntl
import glob
import os
import select
import struct
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from timeprest.engine.runtime.failures import CommError
from timeprest.engine.runtime.wire import DTYPES, MAX_DIMS, Spec
from timeprest.errors import ConfigError, ScheduleError
from timeprest.schedule.lower import Kind

Key = tuple[int, int]

# kind, slot, capacity, nbytes, t, j, dtype, ndim, the dims
_RECORD = struct.Struct(f"<{8 + MAX_DIMS}q")
_CODE: dict[Kind, int] = {"act": 0, "grad": 1}
_CLOSED = 2
_POLL = 0.25  # seconds between checks that a silent peer is still alive
_PAGE = 4096
_READ = 1 << 16  # a pipe's default capacity
_PIPE = 1 << 20  # asked for (Linux's default limit): 8,192 records in flight per pair


class ShmFull(ConfigError):
    """The shared-memory directory has no room for a message."""


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid`` from ``/proc``; None when it does not exist."""
    text = read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields 3.. of proc(5)
    return fields[0], int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    if start is None:  # no /proc: only whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    state = proc_state(pid)
    return state is not None and state[0] not in "ZXx" and state[1] == start


@dataclass
class Slot:
    id: int
    capacity: int
    data: Tensor
    busy: bool = False


@dataclass
class _Out:
    peer: int
    fd: int = -1
    slots: list[Slot] = field(default_factory=list)


@dataclass
class _In:
    peer: int
    pid: int
    start: int | None
    fd: int = -1
    views: dict[int, Tensor] = field(default_factory=dict)
    inbox: dict[Key, tuple[int, ...]] = field(default_factory=dict)
    pending: bytes = b""


@dataclass
class _Files:
    """What closing removes; kept apart from :class:`ShmLinks` so a finalizer can hold it."""

    directory: str
    rank: int
    peers: list[int]
    fds: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        leftovers = [*self.paths]
        for p in self.peers:  # a slot its receiver never mapped, whichever side died
            for a, b in ((self.rank, p), (p, self.rank)):
                leftovers += glob.glob(os.path.join(glob.escape(self.directory), f"{a}-{b}-*"))
        for path in leftovers:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.paths.clear()
        try:
            os.rmdir(self.directory)  # the last rank to close removes it
        except OSError:
            pass


class ShmLinks:
    """This rank's shared-memory channels to its pipeline neighbours, for a pipeline's life."""

    def __init__(
        self,
        directory: str,
        rank: int,
        peers: Sequence[int],
        got: list[dict[str, Any]],
        spin: float = 0.0,
    ):
        self.directory = directory
        self.rank = rank
        self.spin = spin  # seconds a receive reads its FIFO before it sleeps in poll
        self.outs = {p: _Out(p) for p in peers}
        self.ins = {p: _In(p, got[p]["pid"], got[p]["start"]) for p in peers}
        self.by_fd: dict[int, _In] = {}
        self.closed_by: int | None = None
        self.next_slot = 0
        self.waited = 0.0  # seconds receives waited for their messages (ShmTransport.waited)
        self.files = _Files(directory, rank, list(peers))
        self._finalizer = weakref.finalize(self, self.files.close)

    def _fifo(self, src: int, dst: int) -> str:
        return os.path.join(self.directory, f"{src}-{dst}.fifo")

    # -- set-up ---------------------------------------------------------------------
    def make_fifos(self) -> None:
        """Make and open (read-write: never blocks) the FIFOs this rank reads."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for inn in self.ins.values():
            path = self._fifo(inn.peer, self.rank)
            os.mkfifo(path, 0o600)
            self.files.paths.append(path)
            inn.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            self.files.fds.append(inn.fd)
            # more records fit before a sender has to wait for this reader (512 by default)
            setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
            if setsize is not None:
                try:
                    fcntl.fcntl(inn.fd, setsize, _PIPE)
                except OSError:
                    pass
            self.by_fd[inn.fd] = inn

    def connect(self) -> None:
        """Open the FIFOs this rank writes (their readers have them open)."""
        for out in self.outs.values():
            out.fd = os.open(self._fifo(self.rank, out.peer), os.O_WRONLY | os.O_NONBLOCK)
            self.files.fds.append(out.fd)

    def unlink_fifos(self) -> None:
        for inn in self.ins.values():
            path = self._fifo(inn.peer, self.rank)
            os.unlink(path)
            self.files.paths.remove(path)

    # -- sending ----------------------------------------------------------------------
    def _new_slot(self, out: _Out, nbytes: int) -> Slot:
        capacity = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
        path = os.path.join(self.directory, f"{self.rank}-{out.peer}-{self.next_slot}.slot")
        # a neighbour that closed first removed the directory if it was empty
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.files.paths.append(path)
        try:
            # reserve the pages now: a full tmpfs then fails here, with a clear error,
            # instead of killing the process (SIGBUS) when the copy touches a page
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, capacity)
            else:
                os.ftruncate(fd, capacity)
        except OSError as exc:
            raise ShmFull(
                f"no room for a {capacity:,}-byte message in {self.directory} ({exc.strerror}): "
                "enlarge it (docker: --shm-size) or use RuntimeOptions(transport='process-group') "
                "(timeprest train: --transport process-group)"
            ) from exc
        finally:
            os.close(fd)
        data = torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8)
        slot = Slot(self.next_slot, capacity, data)
        self.next_slot += 1
        out.slots.append(slot)
        return slot

    def _wait(self, seconds: float, write_fd: int | None = None) -> None:
        """Wait up to ``seconds`` for a record on any incoming FIFO (read into the inboxes)
        or, with ``write_fd``, for room in that FIFO. ``poll``, not ``select``: a process
        with many files can have descriptors above ``select``'s limit of 1024."""
        poller = select.poll()
        for fd in self.by_fd:
            poller.register(fd, select.POLLIN)
        if write_fd is not None:
            poller.register(write_fd, select.POLLOUT)
        for fd, _ in poller.poll(max(0, int(seconds * 1000))):
            if fd in self.by_fd:
                self._read(self.by_fd[fd])

    def _ring(self, out: _Out, record: bytes, what: str, timeout: float) -> None:
        """Write ``record`` to ``out``'s FIFO; when it is full (the reader is that many
        records behind), wait until it has room, the reader is gone, or the timeout,
        reading our own incoming records meanwhile (two ranks each waiting for room in the
        other's FIFO would otherwise wait for each other)."""
        inn = self.ins[out.peer]
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.write(out.fd, record)
                return
            except BlockingIOError:
                pass
            if not _alive(inn.pid, inn.start):
                cause = ConnectionError(f"the process of rank {out.peer} (pid {inn.pid}) is gone")
                raise CommError(out.peer, what, cause)
            now = time.monotonic()
            if now >= deadline:
                raise CommError(out.peer, what, TimeoutError(f"no room in {timeout:g} s"))
            self._wait(min(_POLL, deadline - now), out.fd)

    def post(
        self, peer: int, kind: Kind, key: Key, x: Tensor, what: str = "", timeout: float = 60.0
    ) -> Slot:
        """Copy contiguous ``x`` into a free slot to ``peer`` and ring its doorbell."""
        out = self.outs[peer]
        nbytes = x.numel() * x.element_size()
        free = [s for s in out.slots if not s.busy and s.capacity >= nbytes]
        slot = min(free, key=lambda s: s.capacity) if free else self._new_slot(out, nbytes)
        if nbytes:
            slot.data[:nbytes].copy_(x.reshape(-1).view(torch.uint8))
        dims = [*x.shape] + [0] * (MAX_DIMS - x.dim())
        head = (_CODE[kind], slot.id, slot.capacity, nbytes, key[0], key[1])
        self._ring(out, _RECORD.pack(*head, DTYPES.index(x.dtype), x.dim(), *dims), what, timeout)
        slot.busy = True
        return slot

    def free_all(self) -> None:
        for out in self.outs.values():
            for slot in out.slots:
                slot.busy = False

    # -- receiving --------------------------------------------------------------------
    def _read(self, inn: _In) -> None:
        data = inn.pending
        while True:
            try:
                chunk = os.read(inn.fd, _READ)
            except BlockingIOError:
                break
            data += chunk
            if len(chunk) < _READ:  # drained: spare the system call that would say so
                break
        n = len(data) - len(data) % _RECORD.size
        for rec in _RECORD.iter_unpack(data[:n]):
            if rec[0] == _CLOSED:
                self.closed_by = inn.peer if self.closed_by is None else self.closed_by
                continue
            key = (rec[4], rec[5])
            if rec[0] not in _CODE.values() or key in inn.inbox:
                raise ScheduleError(
                    f"internal: rank {inn.peer} sent rank {self.rank} a record of kind {rec[0]} "
                    f"for {key} (already waiting: {key in inn.inbox})"
                )
            inn.inbox[key] = rec
        inn.pending = data[n:]

    def take(self, peer: int, key: Key, what: str, timeout: float) -> tuple[Tensor, Spec]:
        """Wait for message ``key`` from ``peer``; a fresh copy of it and its spec."""
        inn = self.ins[peer]
        rec = inn.inbox.pop(key, None)
        if rec is None:  # not read yet: read the FIFOs as records come, waiting if need be
            rec = self._await(inn, key, what, timeout)
        _, slot, capacity, nbytes, _, _, code, ndim, *dims = rec
        spec: Spec = (tuple(dims[:ndim]), DTYPES[code])
        view = inn.views.get(slot)
        if view is None:
            path = os.path.join(self.directory, f"{peer}-{self.rank}-{slot}.slot")
            try:
                view = torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8)
                os.unlink(path)  # both sides have it mapped now
            except Exception as exc:  # the sender closed (and removed it) after ringing
                for other in self.ins.values():
                    self._read(other)
                raise CommError(
                    peer if self.closed_by is None else self.closed_by, what, exc
                ) from exc
            inn.views[slot] = view
        x = torch.empty(spec[0], dtype=spec[1])
        if nbytes:
            x.view(-1).view(torch.uint8).copy_(view[:nbytes])
        return x, spec

    def _await(self, inn: _In, key: Key, what: str, timeout: float) -> tuple[int, ...]:
        """The record of message ``key`` from ``inn``'s peer: the FIFOs read in a loop for
        :attr:`spin` seconds, then ``poll`` until it comes. The time counts in
        :attr:`waited` (a record already in the FIFO costs only its read)."""
        start = now = time.monotonic()
        deadline, check = now + timeout, now + _POLL
        # spin first: a process asleep in poll costs its waker a wake-up (tens of
        # microseconds on a virtual machine), and itself as long to run again
        awake = now + self.spin
        try:
            while (rec := inn.inbox.pop(key, None)) is None:
                if self.closed_by is not None:
                    cause = ConnectionError(
                        f"rank {self.closed_by} closed its channels (it stopped)"
                    )
                    raise CommError(self.closed_by, what, cause)
                now = time.monotonic()
                if now >= check:
                    if not _alive(inn.pid, inn.start):
                        cause = ConnectionError(
                            f"the process of rank {inn.peer} (pid {inn.pid}) is gone"
                        )
                        raise CommError(inn.peer, what, cause)
                    check = now + _POLL
                if now >= deadline:
                    raise CommError(inn.peer, what, TimeoutError(f"no message in {timeout:g} s"))
                if now < awake:  # every incoming FIFO: a closed record may come from either side
                    for other in self.ins.values():
                        self._read(other)
                else:
                    self._wait(min(check, deadline) - now)
            return rec
        finally:
            self.waited += time.monotonic() - start

    # -- end ----------------------------------------------------------------------------
    def close(self, notify: bool) -> None:
        """Release everything; with ``notify``, first tell every neighbour we stopped."""
        if notify and self._finalizer.alive:
            closed = _RECORD.pack(_CLOSED, *([0] * (7 + MAX_DIMS)))
            for out in self.outs.values():
                # a full FIFO gets a moment to make room: a lost record would leave the
                # neighbour waiting for its timeout; a reader that is gone needs none
                deadline = time.monotonic() + 2.0
                while True:
                    try:
                        os.write(out.fd, closed)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            break
                        select.poll().poll(50)
                    except OSError:
                        break
        self._finalizer()
        for out in self.outs.values():
            out.slots.clear()
        for inn in self.ins.values():
            inn.views.clear()
