"""Measure the link between two stage processes: latency and bandwidth of one message.

Two processes send a tensor back and forth over the transport the runtime's
messages take (``process-group``: blocking ``send``/``recv`` of the default
group; ``shm``: the same-host shared-memory channels of
:mod:`timeprest.engine.runtime.shm`); half the median round trip is the one-way time
of a message of that size, and the processes' CPU time per message is the
*overhead*, the time a message takes from the stage that sends or receives
it (on a machine whose cores the stages share, the transport's threads
compete with the compute). The rest of the one-way time, timed for a small
and a large message, separates a fixed part (the latency) from a part that
grows with the size (the bandwidth):
``one_way(size) = overhead + latency + size / bandwidth + overhead``.

:func:`pingpong` runs inside an existing process group (a benchmark's own
ranks); :func:`measure_link` starts two local processes, which gives the
link of a one-machine job such as ``timeprest train --engine distributed``
(over shared memory, as the runtime's messages go on one host). A cluster's link is another matter: measure it there, or
give ``--bandwidth`` and ``--latency``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from timeprest.engine.runtime.group import TRANSPORTS
from timeprest.errors import ConfigError

Exchange = tuple[Callable[[Tensor, int], None], Callable[[Tensor, int], None]]
"""``(send, recv)`` of one message ``i`` to and from the peer."""

SMALL_BYTES = 4
"""Size of the message that measures the latency."""


class Link(NamedTuple):
    """A measured link: what :class:`~timeprest.sim.costmodel.CostModel` calls its link."""

    latency: float
    bandwidth: float | None
    overhead: float


def _process_group(peer: int) -> Exchange:
    def send(x: Tensor, i: int) -> None:
        dist.send(x, peer)

    def recv(x: Tensor, i: int) -> None:
        dist.recv(x, peer)

    return send, recv


def open_neighbour_links(peer: int, ask: str = "shm") -> Any:
    """The runtime's shared-memory channels (:class:`~timeprest.engine.runtime.shm.ShmLinks`)
    between this rank and ``peer``, adjacent ranks of the default group on one host;
    with ``ask="auto"``, None where they cannot run. Collective over the default group."""
    from timeprest.engine.runtime.layout import default_layout
    from timeprest.engine.runtime.shm import open_links

    rank, world = dist.get_rank(), dist.get_world_size()
    if abs(peer - rank) != 1:
        raise ConfigError(f"the shared-memory link joins neighbouring ranks, not {rank} and {peer}")

    def gather(obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def agreed(what: str, fn: Callable[[], None]) -> None:
        """``fn`` here; if it fails on any rank, a ConfigError on every rank."""
        error = None
        try:
            fn()
        except Exception as exc:  # told to every rank, then raised
            error = f"{type(exc).__name__}: {exc}"
        errors = [e for e in gather(error, what) if e is not None]
        if errors:
            raise ConfigError(f"{what} failed: {errors[0]}")

    return open_links(
        ask, str(dist.get_backend()), default_layout(rank, world, 1), 0, gather, agreed
    )


@contextmanager
def shared_memory_exchange(
    peer: int, ask: str = "shm", timeout: float = 60.0
) -> Iterator[Exchange | None]:
    """A ping-pong's ``(send, recv)`` over :func:`open_neighbour_links` for as long as the
    block runs; with ``ask="auto"``, None where shared memory cannot run (the runtime's
    ``auto`` would use the process group there). Both ranks enter and leave together."""
    from timeprest.schedule.lower import Kind

    rank = dist.get_rank()
    links = open_neighbour_links(peer, ask)
    if links is None:
        yield None
        return
    kind: Kind = "act" if peer > rank else "grad"

    def send(x: Tensor, i: int) -> None:
        links.post(peer, kind, (i, 0), x, "a link measurement", timeout).busy = False

    def recv(x: Tensor, i: int) -> None:
        links.take(peer, (i, 0), "a link measurement", timeout)  # a fresh copy, as the runtime

    try:
        yield send, recv
    finally:
        dist.barrier()  # neither side closes while the other still reads
        links.close(notify=False)


def pingpong(
    peer: int,
    nbytes: int,
    *,
    first: bool,
    repeats: int = 30,
    warmup: int = 5,
    exchange: Exchange | None = None,
) -> tuple[float, float]:
    """Median one-way seconds of an ``nbytes`` message to ``peer`` and back, and this
    process's CPU seconds per message (all its threads, sending or receiving).

    Both ranks call it with the same arguments except ``first`` (exactly one
    of them starts each exchange). ``exchange``: how a message goes (default: the
    default group's blocking ``send``/``recv``).
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"pingpong needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    send, recv = exchange or _process_group(peer)
    buf = torch.zeros(max(nbytes, 1), dtype=torch.uint8)
    times: list[float] = []
    cpus: list[float] = []
    for i in range(warmup + repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        if first:
            send(buf, i)
            recv(buf, i)
        else:
            recv(buf, i)
            send(buf, i)
        if i >= warmup:
            times.append((time.perf_counter() - t0) / 2)
            cpus.append((time.process_time() - c0) / 2)
    # the mean, not the median: a stage pays for every message's CPU time
    return statistics.median(times), statistics.fmean(cpus)


def fit_link(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float | None]:
    """``(latency, bandwidth)`` from the one-way times of a small and a large message.

    The bandwidth is ``None`` (infinite) when the large message was not
    slower than the small one; the latency is never negative.
    """
    (b0, t0), (b1, t1) = small, large
    if b1 <= b0:
        raise ConfigError(f"the large message ({b1} bytes) must be larger than the small ({b0})")
    if t1 <= t0:
        return max(t1, 0.0), None
    bandwidth = (b1 - b0) / (t1 - t0)
    return max(t0 - b0 / bandwidth, 0.0), bandwidth


def link_between(
    peer: int, nbytes: int, *, first: bool, repeats: int = 60, transport: str = "process-group"
) -> Link:
    """The link to ``peer`` for messages of ``nbytes``, from two ping-pongs over
    ``transport`` (``process-group`` or ``shm``: what ``DistributedRuntime.transport``
    says the runtime uses; ``auto``: shared memory where it can run, as the runtime's).

    The overhead is the CPU time per message of ``nbytes`` (both ranks'
    mean, so every rank gets the same figure). A one-way time covers the
    sender's overhead, the flight and the receiver's overhead, so latency
    and bandwidth are fitted to the one-way times less twice the overhead.
    """
    if transport not in TRANSPORTS:
        raise ConfigError(f"unknown transport {transport!r}: expected auto, shm or process-group")
    big = max(nbytes, SMALL_BYTES + 1)
    # no exchange (None): the default group's send/recv, also where "auto" finds no shm
    channels = (
        nullcontext(None)
        if transport == "process-group"
        else shared_memory_exchange(peer, transport)
    )
    with channels as exchange:
        t_small, cpu_small = pingpong(
            peer, SMALL_BYTES, first=first, repeats=repeats, exchange=exchange
        )
        t_big, cpu_big = pingpong(peer, big, first=first, repeats=repeats, exchange=exchange)
    both = torch.tensor([cpu_small, cpu_big], dtype=torch.float64)
    dist.all_reduce(both)
    o_small, o_big = (float(v) / dist.get_world_size() for v in both)
    latency, bandwidth = fit_link(
        (SMALL_BYTES, max(t_small - 2 * o_small, 0.0)), (big, max(t_big - 2 * o_big, 0.0))
    )
    return Link(latency, bandwidth, o_big)


def _worker(
    rank: int, rdv: str, nbytes: int, repeats: int, transport: str, out: mp.Queue[object]
) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rdv}",
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=60),
        )
        result = link_between(
            1 - rank, nbytes, first=rank == 0, repeats=repeats, transport=transport
        )
        dist.destroy_process_group()
        if rank == 0:
            out.put(result)
    except Exception as exc:  # reported by the parent as one line
        out.put(f"rank {rank}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")


def measure_link(
    nbytes: int, *, repeats: int = 60, timeout: float = 120.0, transport: str = "auto"
) -> Link:
    """The :class:`Link` between two new processes on this machine for ``nbytes`` messages,
    over the transport the runtime would use there (``auto``: shared memory where it can
    run, else gloo on loopback), or the one named (``shm``, ``process-group``)."""
    if not isinstance(nbytes, int) or nbytes <= SMALL_BYTES:
        raise ConfigError(f"measure the link with messages of more than {SMALL_BYTES} bytes")
    ctx = mp.get_context("spawn")
    out: mp.Queue[object] = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="timeprest-link-") as tmp:
        rdv = os.path.join(tmp, "rdv")
        procs = [
            ctx.Process(target=_worker, args=(r, rdv, nbytes, repeats, transport, out), daemon=True)
            for r in range(2)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        got: object = f"no answer within {timeout:.0f} s"
        try:
            while time.monotonic() < deadline:
                try:
                    got = out.get(timeout=0.2)
                    break
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead and out.empty():
                        got = f"a measuring process exited with code {dead[0]}"
                        break
        finally:
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if isinstance(got, str):
        raise ConfigError(f"measuring the link failed: {got}")
    assert isinstance(got, tuple)
    return Link(*got)
