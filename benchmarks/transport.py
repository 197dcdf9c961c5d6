"""Cost of one stage-to-stage message: shared memory + FIFO doorbell against gloo send/recv.

Two processes, one intra-op thread each, on this host. Per transport and
message size (float32 payloads):

- ping-pong: rank 0 sends a message, rank 1 receives it and sends one of
  the same size back; wall time per round trip, and each process's CPU time
  (all its threads: gloo's included) per send + receive pair;
- stream: rank 0 sends K messages in windows of 8, rank 1 receives them and
  answers each window with one small message (which frees the window's
  slots, as a later message of the pipeline does); wall and CPU per message.

The transports are the runtime's own: ``ShmLinks`` (:mod:`timeprest.engine.runtime.shm`)
and the world group's point-to-point ``send``/``recv`` that ``P2PTransport`` uses.

Run::

    python benchmarks/transport.py                  # 16 KB .. 2 MB, 200 messages each
    python benchmarks/transport.py --count 500 --sizes 16,2048
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from timeprest.sim.link import open_neighbour_links

WINDOW = 8


class Gloo:
    name = "gloo"

    def __init__(self, rank: int) -> None:
        self.peer = 1 - rank
        world = dist.group.WORLD
        assert world is not None
        self.group = world
        self.pending: list[tuple[Any, Tensor]] = []

    def send(self, x: Tensor, i: int) -> None:
        self.pending.append((self.group.send([x], self.peer, i % 2**31), x))

    def recv(self, like: Tensor, i: int) -> Tensor:
        buf = torch.empty_like(like)
        self.group.recv([buf], self.peer, i % 2**31).wait()
        return buf

    def settle(self) -> None:  # the peer answered: our sends are done
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class Shm:
    name = "shm"

    def __init__(self, rank: int) -> None:
        links = open_neighbour_links(1 - rank)  # the runtime's channels, as the simulator's
        self.links = links
        self.peer = 1 - rank
        self.kind: Any = "act" if rank == 0 else "grad"
        self.pending: list[Any] = []

    def send(self, x: Tensor, i: int) -> None:
        self.pending.append(self.links.post(self.peer, self.kind, (i, 0), x))

    def recv(self, like: Tensor, i: int) -> Tensor:
        return self.links.take(self.peer, (i, 0), f"message {i}", 60.0)[0]

    def settle(self) -> None:
        for slot in self.pending:
            slot.busy = False
        self.pending.clear()


def _measure(rank: int, t: Any, nbytes: int, count: int) -> dict[str, float]:
    x = torch.randn(nbytes // 4)
    ack = torch.zeros(1)
    dist.barrier()
    # ping-pong
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(count):
        if rank == 0:
            t.send(x, 2 * i)
            t.recv(x, 2 * i + 1)
        else:
            t.recv(x, 2 * i)
            t.send(x, 2 * i + 1)
        t.settle()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    dist.barrier()
    # stream
    base = 2 * count
    c1, w1 = time.process_time(), time.perf_counter()
    for start in range(0, count, WINDOW):
        ids = range(start, min(start + WINDOW, count))
        if rank == 0:
            for i in ids:
                t.send(x, base + i)
            t.recv(ack, base + count + start)
        else:
            for i in ids:
                t.recv(x, base + i)
            t.send(ack, base + count + start)
        t.settle()
    swall, scpu = time.perf_counter() - w1, time.process_time() - c1
    dist.barrier()
    return {
        "rtt_us": wall / count * 1e6,
        "pp_cpu_us": cpu / count * 1e6,
        "stream_us": swall / count * 1e6,
        "stream_cpu_us": scpu / count * 1e6,
    }


def worker(rank: int, args: argparse.Namespace, rdv: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rdv}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    rows = []
    for make in (Gloo, Shm):
        t = make(rank)
        for kb in args.sizes:
            _measure(rank, t, kb * 1024, 10)  # warm-up
            got = _measure(rank, t, kb * 1024, args.count)
            both: list[Any] = [None, None]
            dist.all_gather_object(both, got)
            rows.append((t.name, kb, both))
    if rank == 0:
        print(
            f"{'transport':>9} {'KB':>6} {'rtt us':>8} {'ping-pong CPU us/pair r0,r1':>28} "
            f"{'stream us/msg':>13} {'stream CPU us/msg r0,r1':>24}"
        )
        for name, kb, (a, b) in rows:
            print(
                f"{name:>9} {kb:>6} {a['rtt_us']:8.1f} "
                f"{a['pp_cpu_us']:13.1f},{b['pp_cpu_us']:13.1f} {a['stream_us']:13.1f} "
                f"{a['stream_cpu_us']:11.1f},{b['stream_cpu_us']:11.1f}"
            )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,128,512,2048", help="message sizes in KB")
    p.add_argument("--count", type=int, default=200, help="messages per size and pattern")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"2 processes, 1 thread each, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"{args.count} messages per size; float32 payloads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, f"{tmp}/rdv"), nprocs=2)


if __name__ == "__main__":
    main()
