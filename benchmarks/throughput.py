"""Throughput of the distributed runtime against torch.distributed.pipelining, W = 2 on CPU.

Two processes, one stage each, one intra-op thread each (gloo on loopback).
Both stages are the same stack of Linear+ReLU layers, so they cost the same.
In one run, interleaved over several rounds (medians reported):

- our runtime: ``gpipe`` and ``1f1b`` (with flush, synchronous),
  ``pipedream`` (N = 1: a mini-batch is one micro-batch), ``v-timeprest`` and
  ``i-timeprest`` (nF1B, N micro-batches per mini-batch);
- PyTorch's ``Schedule1F1B`` and ``ScheduleGPipe`` on the same split, with
  the same micro-batch size, N micro-batches per step and an optimizer step
  after each;
- the bound ``micro-batch size / max_s (F_s + B_s)``: each stage's forward
  and backward of one micro-batch timed in isolation (plain autograd, both
  processes at once, no communication, no update), measured before the
  first run of a round and again after every run, because the machine's
  load drifts; each run is held against the mean of the two measurements
  around it. The order of the methods turns by one every round, so that
  none always runs first or last;
- the simulator's prediction for each of our methods: in every round both
  processes profile the two stages at once with
  ``timeprest.sim.profile.profile_stages(method=...)`` right before each
  method's run, which times each
  method's own engine path (the emulator's stage code: weight versions,
  hooks, update; one thread each, as in the runs; stage s's costs are taken
  from rank s); the link (per-message overhead, latency, bandwidth) is
  measured in every round by a ping-pong of the two processes
  (``timeprest.sim.link.link_between``); and
  ``timeprest.sim.simulate(method, W, N, T, cost_model,
  order_costs="default")`` (the order ``Pipeline`` uses) predicts that
  round's time per mini-batch. It is compared with the measured time per
  mini-batch: "wall" is the timed run's wall time over its mini-batches
  (fill and drain of the one ``train()`` call included; warm-up excluded),
  "steady" the mean interval between successive losses at the last stage
  over the middle half of the mini-batches (no fill or drain, like the
  simulator's figure); ratios are medians over rounds of per-round ratios.

Run::

    python benchmarks/throughput.py                   # N = 2 (= W, Pipeline's default)
    python benchmarks/throughput.py --microbatches 4
    python benchmarks/throughput.py --width 384 --layers 4 --micro-batch 256

Every method trains its own copy of the same initial weights on the same
batches; samples/s = samples / wall time of rank 0 between two barriers.
"CPU ms/mb" is each process's CPU time (all threads) per micro-batch: on a
shared machine it tells load from overhead. Run it on an otherwise idle
machine: other jobs fill a pipeline's bubbles and blur the comparison.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import resource
import socket
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import timeprest
from timeprest.engine.runtime import RuntimeOptions
from timeprest.sim import simulate
from timeprest.sim.costmodel import CostModel
from timeprest.sim.link import Link, link_between
from timeprest.sim.profile import profile_stages

W = 2
OURS = ("gpipe", "1f1b", "pipedream", "v-timeprest", "i-timeprest")
THEIRS = ("torch-1F1B", "torch-GPipe")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512, help="features of every layer")
    p.add_argument("--layers", type=int, default=3, help="Linear+ReLU layers per stage")
    p.add_argument("--micro-batch", type=int, default=256, help="rows per micro-batch")
    p.add_argument(
        "--microbatches", type=int, default=2, help="N per mini-batch (default W, as Pipeline's)"
    )
    p.add_argument(
        "--minibatches", type=int, default=0, help="mini-batches per timed run (default 96 / N)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--methods", default=",".join(OURS + THEIRS), help="comma-separated subset")
    args = p.parse_args()
    if args.minibatches <= 0:
        args.minibatches = max(96 // args.microbatches, 1)
    return args


def make_stage(width: int, layers: int) -> nn.Module:
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-4)


def barrier_time() -> float:
    dist.barrier()
    return time.perf_counter()


def cpu_seconds() -> float:
    """CPU time of this process, every thread (gloo's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def isolated_stage_time(module: nn.Module, rank: int, rows: int, width: int) -> tuple[float, float]:
    """Median seconds of this stage's forward and backward of one micro-batch."""
    m = copy.deepcopy(module)
    x = torch.randn(rows, width, requires_grad=rank > 0)
    target = torch.randn(rows, width)
    grad = torch.randn(rows, width)
    fwd, bwd = [], []
    for i in range(25):
        t0 = time.perf_counter()
        out = m(x)
        if rank == W - 1:
            out = nn.functional.mse_loss(out, target)
        t1 = time.perf_counter()
        if rank == W - 1:
            out.backward()
        else:
            out.backward(grad)
        t2 = time.perf_counter()
        m.zero_grad(set_to_none=True)
        x.grad = None
        if i >= 5:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


def profiled_costs(
    stages: list[nn.Module], batch: tuple[Tensor, Tensor], n: int, method: str
) -> CostModel:
    """Both stages profiled by the simulator's own profiler (in this process, one thread),
    through the engine path of ``method``."""
    x, y = batch
    return profile_stages(
        stages,
        x,
        n,
        sample_target=y,
        loss_fn=nn.functional.mse_loss,
        optimizer=sgd,
        warmup=2,
        repeats=6,
        method=method,
    )


def steady_interval(stamps: list[float]) -> float:
    """Mean interval between successive losses over the middle half (no fill, no drain)."""
    t = len(stamps)
    a, b = t // 4, t - 1 - t // 4
    if b <= a:
        a, b = 0, t - 1
    return (stamps[b] - stamps[a]) / max(b - a, 1)


class Ours:
    def __init__(self, method: str, module: nn.Module, n: int, rank: int) -> None:
        self.last = rank == W - 1
        self.stamps: list[float] = []
        self.pipe = timeprest.Pipeline(
            [module if s == rank else None for s in range(W)],  # only our own stage
            method=method,
            num_microbatches=1 if method == "pipedream" else n,
            optimizer=sgd,
            loss_fn=nn.functional.mse_loss,
            engine="distributed",
            runtime=RuntimeOptions(timeout=300, num_threads=None),
        )

    def _stamp(self, minibatch: int, loss: float) -> None:
        self.stamps.append(time.perf_counter())

    def run(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.stamps = []
        runner = self.pipe.runners[0]
        runner.action_times, runner.recv_seconds = [], 0.0
        # on_loss is called live on the last rank: the time each mini-batch's loss is known
        self.pipe.train(batches, on_loss=self._stamp if self.last else None)
        # seconds per micro-batch of this stage's F, B and U actions in the run, and of
        # the waiting for a neighbour's message inside them
        micro = sum(count for kind, _, count, _ in runner.action_times if kind == "B")
        self.breakdown = tuple(
            sum(sec for k, _, _, sec in runner.action_times if k == kind) / micro for kind in "FBU"
        ) + (runner.recv_seconds / micro,)
        runner.action_times = None


class Theirs:
    def __init__(self, kind: str, module: nn.Module, n: int, rank: int, rows: int, width: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.rank = rank
        self.module = module
        # shapes are inferred at the first step, by messages between the stages
        stage = PipelineStage(module, rank, W, torch.device("cpu"))
        cls = Schedule1F1B if kind == "torch-1F1B" else ScheduleGPipe
        self.schedule = cls(stage, n_microbatches=n, loss_fn=nn.functional.mse_loss)
        self.opt = sgd(list(module.parameters()))

    def run(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in batches:
            if self.rank == 0:
                self.schedule.step(x)
            else:
                self.schedule.step(target=y)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=W,
        timeout=datetime.timedelta(seconds=600),
    )
    load = os.getloadavg()[0]
    width, m, n, t = args.width, args.micro_batch, args.microbatches, args.minibatches
    stages = []
    for s in range(W):  # every rank builds both stages (to profile them); runs only its own
        torch.manual_seed(s)
        stages.append(make_stage(width, args.layers))
    base = stages[rank]
    g = torch.Generator().manual_seed(0)
    # one set of micro-batch-sized rows; a mini-batch is N of them (pipedream: one)
    big = [(torch.randn(n * m, width, generator=g), torch.randn(n * m, width, generator=g))]
    batches = big * t
    small = [(x[:m], y[:m]) for x, y in big] * (t * n)

    methods = [s for s in args.methods.split(",") if s]
    runners: dict[str, Any] = {}
    for name in methods:
        module = copy.deepcopy(base)
        if name in OURS:
            runners[name] = Ours(name, module, n, rank)
        else:
            runners[name] = Theirs(name, module, n, rank, m, width)
    data = {name: (small if name == "pipedream" else batches) for name in methods}
    # warm-up: shapes, allocator, first-call costs
    for name in methods:
        runners[name].run(data[name][:2])
    links: list[Link] = []  # per round: the link of these two processes (gloo on loopback)
    rates: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[list[float]]] = {name: [] for name in methods}
    stage_times: list[list[tuple[float, float]]] = []
    # per method, per round, per rank: (F, B, U) of every stage
    profiles: dict[str, list[list[Any]]] = {name: [] for name in methods if name in OURS}
    template: CostModel | None = None
    steady: dict[str, list[float]] = {name: [] for name in methods if name in OURS}
    # per method, per round, per rank: (F, B, U, waiting) seconds per micro-batch in the run
    breakdowns: dict[str, list[list[Any]]] = {name: [] for name in methods if name in OURS}
    # per method, per round: the bound around its run (samples/s)
    bounds: dict[str, list[float]] = {name: [] for name in methods}

    def isolated() -> float:
        """Both processes time their stage at once; the slower stage's F + B, in seconds."""
        barrier_time()
        both: list[Any] = [None] * W
        dist.all_gather_object(both, isolated_stage_time(base, rank, m, width))
        stage_times.append(both)
        return max(f + b for f, b in both)

    for r in range(args.rounds):
        links.append(link_between(1 - rank, m * width * 4, first=rank == 0))
        # the order turns every round, so that no method always runs first or last
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        # the bound is measured between every two runs (the machine's load drifts); a
        # run is held against the mean of the measurements just before and after it
        before = isolated()
        for name in order:
            if name in profiles:  # the simulator's profile right before the run it predicts
                barrier_time()  # both processes at once, like the runs
                nn_ = 1 if name == "pipedream" else n
                cm = profiled_costs(stages, data[name][0], nn_, name)
                template = template or cm
                prof: list[Any] = [None] * W
                dist.all_gather_object(
                    prof, [(c.forward_time, c.backward_time, c.update_time) for c in cm.stages]
                )
                profiles[name].append(prof)
            t0 = barrier_time()
            c0 = cpu_seconds()
            runners[name].run(data[name])
            c1 = cpu_seconds()
            t1 = barrier_time()
            rates[name].append(t * n * m / (t1 - t0))
            used: list[Any] = [None] * W
            dist.all_gather_object(used, (c1 - c0) / (t * n))
            cpu[name].append(used)
            if name in steady:
                parts: list[Any] = [None] * W
                dist.all_gather_object(parts, runners[name].breakdown)
                breakdowns[name].append(parts)
                st: list[Any] = [None] * W
                dist.all_gather_object(st, runners[name].stamps)
                steady[name].append(steady_interval(st[W - 1]))
            after = isolated()
            bounds[name].append(m / ((before + after) / 2))
            before = after
    if rank == 0:
        report(args, stage_times, bounds, rates, cpu, load)
        assert template is not None
        predict(args, profiles, template, links, rates, steady)
        where_time_goes(args, stage_times, breakdowns, rates)
    dist.destroy_process_group()


def report(
    args: argparse.Namespace,
    stage_times: list[list[tuple[float, float]]],
    bounds: dict[str, list[float]],
    rates: dict[str, list[float]],
    cpu: dict[str, list[list[float]]],
    load: float,
) -> None:
    m = args.micro_batch
    points = [m / max(f + b for f, b in both) for both in stage_times]
    cpu_name = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu_name = next(
                ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    print("== throughput: W=2 stages, one process each, gloo on loopback ==")
    print(
        f"torch {torch.__version__}, timeprest {timeprest.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} cores ({cpu_name}), "
        f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    print(
        f"model: {args.layers} x Linear({args.width},{args.width})+ReLU per stage, float32; "
        f"micro-batch {m} rows, N={args.microbatches} per mini-batch "
        f"(pipedream: N=1, mini-batch = one micro-batch), {args.minibatches} mini-batches "
        f"per timed run, {args.rounds} rounds, {args.threads} intra-op thread(s) per process"
    )
    for s in range(W):
        f = statistics.median(t[s][0] for t in stage_times)
        b = statistics.median(t[s][1] for t in stage_times)
        print(f"stage {s} in isolation: F {f * 1e3:.2f} ms, B {b * 1e3:.2f} ms per micro-batch")
    print(
        f"bound m / max_s(F_s+B_s), measured before the first run and after every run: "
        f"median {statistics.median(points):,.0f} samples/s, range {min(points):,.0f} to "
        f"{max(points):,.0f} over {len(points)} measurements"
    )
    print(
        "each run is held against the mean of the two bound measurements around it; "
        "ratios are medians over rounds of per-round ratios; the order of the methods "
        "turns every round"
    )
    print()
    theirs = rates.get("torch-1F1B")
    print(
        f"{'method':<14}{'samples/s':>11}{'bound':>9}{'/ bound':>9}{'/ torch-1F1B':>14}"
        f"{'CPU ms/mb s0, s1':>18}  samples/s per round"
    )
    for name, rs in rates.items():
        of_bound = statistics.median(r / b for r, b in zip(rs, bounds[name]))
        vs = f"{statistics.median(r / q for r, q in zip(rs, theirs)):.2f}x" if theirs else "-"
        rounds = " ".join(f"{x:,.0f}" for x in rs)
        used = ", ".join(
            f"{statistics.median(c[s] for c in cpu[name]) * 1e3:.1f}" for s in range(W)
        )
        print(
            f"{name:<14}{statistics.median(rs):>11,.0f}{statistics.median(bounds[name]):>9,.0f}"
            f"{of_bound:>9.2f}{vs:>14}{used:>18}  {rounds}"
        )
    sys.stdout.flush()


def predict(
    args: argparse.Namespace,
    profiles: dict[str, list[list[Any]]],
    template: CostModel,
    links: list[Link],
    rates: dict[str, list[float]],
    steady: dict[str, list[float]],
) -> None:
    """The simulator's time per mini-batch next to the measured one, for each of our methods.

    Each round's prediction uses that round's profile, so that load drifting
    between rounds hits both sides of a ratio alike; the ratios reported are
    medians over rounds of the per-round ratios.
    """
    n, m, t = args.microbatches, args.micro_batch, args.minibatches
    print()
    print("== simulator vs runtime: time per mini-batch ==")
    print(
        "costs: profile_stages(method=...) times each method's own engine path (emulator, "
        "both processes at once, one thread each) in every round; stage s from rank s"
    )
    print(
        "link per round (timeprest.sim.link.link_between, ping-pong of these two processes; "
        f"{template.stages[0].output_bytes:,}-byte messages): overhead ms per message sent or "
        "received "
        + " ".join(f"{k.overhead * 1e3:.3f}" for k in links)
        + "; latency ms "
        + " ".join(f"{k.latency * 1e3:.3f}" for k in links)
        + "; bandwidth GB/s "
        + " ".join("inf" if k.bandwidth is None else f"{k.bandwidth / 1e9:.2f}" for k in links)
    )
    print(
        'simulate(method, W, N, T, cost_model, order_costs="default") per round; measured: '
        "wall = timed run / its mini-batches, steady = mean interval between losses at "
        "the last stage over the middle half; times are medians over rounds, ratios medians "
        "of per-round ratios"
    )
    print(
        f"{'method':<14}{'N':>3}{'T':>5}{'F,B,U s0 ms':>17}{'F,B,U s1 ms':>17}"
        f"{'predicted ms':>14}{'wall ms':>9}{'pred/wall':>11}{'steady ms':>11}{'pred/steady':>13}"
        "  pred/steady per round"
    )
    for name, rounds in profiles.items():
        nn_ = 1 if name == "pipedream" else n
        count = t * n // nn_  # mini-batches in a timed run
        preds: list[float] = []
        for prof in rounds:
            costs = tuple(
                replace(
                    template.stages[s],
                    forward_time=prof[s][s][0],  # stage s as profiled by rank s
                    backward_time=prof[s][s][1],
                    update_time=prof[s][s][2],
                )
                for s in range(W)
            )
            k = links[len(preds)]
            cm = replace(
                template,
                stages=costs,
                latency=k.latency,
                bandwidth=k.bandwidth,
                overhead=k.overhead,
            )
            sim = simulate(name, W, nn_, count, cm, order_costs="default")
            preds.append(sim.time_per_minibatch)
        # samples/s -> seconds per mini-batch of nn_ micro-batches
        walls = [nn_ * m / r for r in rates[name]]
        per_round = [p / st for p, st in zip(preds, steady[name])]
        fbu = [
            ",".join(f"{statistics.median(p[s][s][i] for p in rounds) * 1e3:.1f}" for i in range(3))
            for s in range(W)
        ]
        print(
            f"{name:<14}{nn_:>3}{count:>5}{fbu[0]:>17}{fbu[1]:>17}"
            f"{statistics.median(preds) * 1e3:>14.2f}{statistics.median(walls) * 1e3:>9.2f}"
            f"{statistics.median(p / w for p, w in zip(preds, walls)):>11.2f}"
            f"{statistics.median(steady[name]) * 1e3:>11.2f}{statistics.median(per_round):>13.2f}"
            "  " + " ".join(f"{r:.2f}" for r in per_round)
        )
    sys.stdout.flush()


def where_time_goes(
    args: argparse.Namespace,
    stage_times: list[list[tuple[float, float]]],
    breakdowns: dict[str, list[list[Any]]],
    rates: dict[str, list[float]],
) -> None:
    """Each stage's actions in our runs, per micro-batch, next to its F + B in isolation."""
    m = args.micro_batch
    print()
    print("== where the time goes in our runs (ms per micro-batch, medians over rounds) ==")
    print(
        "F, B, U: this stage's actions as timed inside the run (F and B include waiting for "
        "a neighbour's message); waiting: the receives' share of F and B; work: "
        "F + B + U - waiting; period: wall time per micro-batch of the run"
    )
    iso = [statistics.median(t[s][0] + t[s][1] for t in stage_times) * 1e3 for s in range(W)]
    print("isolated F + B: " + ", ".join(f"stage {s} {iso[s]:.2f}" for s in range(W)))
    print(
        f"{'method':<14}{'stage':>6}{'F':>8}{'B':>8}{'U':>7}{'waiting':>9}{'work':>8}"
        f"{'work / isolated F+B':>21}{'period':>8}"
    )
    for name, rounds in breakdowns.items():
        period = statistics.median(m / r for r in rates[name]) * 1e3
        for s in range(W):
            f, b, u, wait = (statistics.median(r[s][i] for r in rounds) * 1e3 for i in range(4))
            work = statistics.median((sum(r[s][:3]) - r[s][3]) for r in rounds) * 1e3
            print(
                f"{name:<14}{s:>6}{f:>8.2f}{b:>8.2f}{u:>7.2f}{wait:>9.2f}{work:>8.2f}"
                f"{work / iso[s]:>21.2f}{period:>8.2f}"
            )
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    args = parse()
    mp.spawn(worker, args=(args, free_port()), nprocs=W, join=True)


if __name__ == "__main__":
    main()
