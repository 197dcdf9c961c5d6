"""Throughput of the distributed runtime against torch.distributed.pipelining, W = 2 on CPU.

Two processes, one stage each, one intra-op thread each: our runtime's
stage-to-stage messages over its default transport on one host (shared
memory; ``--transport process-group`` for gloo's send/recv), torch's over
gloo on loopback.
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
  processes at once, no communication; steps of N micro-batches, the first
  backward of a step writing fresh gradients, the others adding to them,
  then an SGD step timed apart as U, outside the bound), measured before the
  first run of a round and again after every run, because the machine's
  load drifts; each run is held against the mean of the two measurements
  around it. The order of the methods turns by one every round, so that
  none always runs first or last;
- the own bound of each method: the same with the method's own arithmetic
  per micro-batch (F, the backward: fresh for a mini-batch's first
  micro-batch, adding to the gradients for the others, and 1/N of U;
  pipedream all of U), which is what a perfect engine would reach;
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
  A second prediction ("run") takes each stage's costs from the runtime
  itself: right after the emulator's profile, a short run of the runtime
  (the profile's mini-batches) with its actions timed, the waiting for
  messages left out (``Pipeline.time_actions``); those times
  hold the sends and receives, so the link adds only its latency and
  bandwidth. The gap between the two predictions is what the emulator's
  profile misses of the runtime's actions (their messages, and the same
  Python running with colder caches between two processes).

Run::

    python benchmarks/throughput.py                   # N = 2 (= W, Pipeline's default)
    python benchmarks/throughput.py --microbatches 4
    python benchmarks/throughput.py --width 384 --layers 4 --micro-batch 256
    python benchmarks/throughput.py --grid --out docs/results/grid   # the grid of issue 11

``--grid`` runs the points of ``benchmarks/_grid.py`` one after another (each
in its own pair of processes, ``--grid-rounds`` rounds, runs sized to the
point's cost), prints each point's tables and then a summary: per method
and point the ratio to ``Schedule1F1B``, to the concurrent bound (both
processes computing F + B + U at once, no communication) and to the bound
alone (each process timing its stage while the other waits), and the
simulator's prediction over the steady measured time, then the grid read
against issue 11's targets (how many cells meet each, and the misses); it
writes the summary as markdown, the raw figures as JSON and a PNG of the
ratios into ``--out``. ``--targets DIR/throughput-grid.json`` reads a saved
grid against the targets again without running anything.

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
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _grid  # noqa: E402  (the grid shared with engine_overhead.py)
from _grid import make_stage  # noqa: E402

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
    p.add_argument("--grid", action="store_true", help="run the grid of benchmarks/_grid.py")
    p.add_argument("--grid-rounds", type=int, default=2, help="rounds per grid point")
    p.add_argument(
        "--grid-points", default="", help="comma-separated indices into the grid (default: all)"
    )
    p.add_argument("--out", default="results/throughput-grid", help="grid: markdown and PNG here")
    p.add_argument("--transport", default="auto", choices=["auto", "shm", "process-group"])
    p.add_argument(
        "--spin",
        type=float,
        default=None,
        help="our runtime's RuntimeOptions.spin in seconds (default: the runtime's choice; "
        "the link measurement keeps the default)",
    )
    p.add_argument(
        "--no-fused-accumulation",
        dest="fused",
        action="store_false",
        help="our runtime with Pipeline(fused_accumulation=False) (for the A/B)",
    )
    p.add_argument(
        "--targets",
        default="",
        metavar="JSON",
        help="only read a saved grid (its throughput-grid.json) against issue 11's targets "
        "and print that; runs nothing",
    )
    p.add_argument("--result", default="", help=argparse.SUPPRESS)  # rank 0's summary (JSON)
    args = p.parse_args()
    if args.spin is not None and not 0 <= args.spin < float("inf"):
        p.error(f"--spin must be seconds >= 0, got {args.spin}")
    # samples per measurement (bound) and mini-batches per profile: the grid sizes them
    args.bound_iters, args.profile_warmup, args.profile_repeats = 25, 2, 6
    if args.minibatches <= 0:
        args.minibatches = max(96 // args.microbatches, 1)
    return args


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-4)


def barrier_time() -> float:
    dist.barrier()
    return time.perf_counter()


def cpu_seconds() -> float:
    """CPU time of this process, every thread (gloo's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


Times = tuple[float, float, float, float]  # F, B, U, B accumulating, seconds per micro-batch


def isolated_stage_time(
    module: nn.Module, rank: int, rows: int, width: int, iters: int = 25, n: int = 1
) -> Times:
    """Median seconds of this stage's forward, backward and SGD step of one micro-batch,
    and of a backward that adds into gradients already there.

    Steps of ``n`` micro-batches (at least two), as a method with N = n runs them: the
    first backward of a step writes fresh gradients, the others add to them (reading and
    writing every weight's gradient once more: at wide layers and narrow micro-batches that
    is most of a backward); then one SGD step. F, B and U are the issue's bound (a fresh
    backward and one step per micro-batch); B accumulating is what a method with N > 1
    pays from its second micro-batch on.
    """
    m = copy.deepcopy(module)
    opt = sgd(list(m.parameters()))
    x = torch.randn(rows, width, requires_grad=rank > 0)
    target = torch.randn(rows, width)
    grad = torch.randn(rows, width)
    per_step = max(n, 2)
    steps = max(2, -(-iters // per_step))
    warm = max(1, steps // 5)
    fwd: list[float] = []
    bwd: list[float] = []
    acc: list[float] = []
    upd: list[float] = []
    for i in range(steps + warm):
        for j in range(per_step):
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
            x.grad = None
            if i >= warm:
                fwd.append(t1 - t0)
                (bwd if j == 0 else acc).append(t2 - t1)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        m.zero_grad(set_to_none=True)
        if i >= warm:
            upd.append(t3 - t2)
    med = statistics.median
    return med(fwd), med(bwd), med(upd), med(acc)


def own_work(times: Times, n: int) -> float:
    """Seconds of arithmetic per micro-batch of a method with N = n on one stage: F, the
    backwards (the first of a mini-batch fresh, the others accumulating) and 1/n update."""
    f, b, u, acc = times
    return f + (b + (n - 1) * acc) / n + u / n


def profiled_costs(
    stages: list[nn.Module],
    batch: tuple[Tensor, Tensor],
    n: int,
    method: str,
    warmup: int = 2,
    repeats: int = 6,
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
        warmup=warmup,
        repeats=repeats,
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
    def __init__(
        self,
        method: str,
        module: nn.Module,
        n: int,
        rank: int,
        transport: Any,
        spin: Any,
        fused: bool = True,
    ) -> None:
        self.last = rank == W - 1
        self.stamps: list[float] = []
        self.pipe = timeprest.Pipeline(
            [module if s == rank else None for s in range(W)],  # only our own stage
            method=method,
            num_microbatches=1 if method == "pipedream" else n,
            optimizer=sgd,
            loss_fn=nn.functional.mse_loss,
            engine="distributed",
            runtime=RuntimeOptions(timeout=300, num_threads=None, transport=transport, spin=spin),
            fused_accumulation=fused,
        )

    def _stamp(self, minibatch: int, loss: float) -> None:
        self.stamps.append(time.perf_counter())

    def run(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.stamps = []
        runner = self.pipe.runners[0]
        runner.action_times, runner.recv_seconds, runner.wait_seconds = [], 0.0, 0.0
        # on_loss is called live on the last rank: the time each mini-batch's loss is known
        self.pipe.train(batches, on_loss=self._stamp if self.last else None)
        # seconds per micro-batch of this stage's F, B and U actions in the run, of the
        # receives inside them, and of the receives' waiting for a message on its way
        micro = sum(count for kind, _, count, *_ in runner.action_times if kind == "B")
        self.breakdown = tuple(
            sum(sec for k, _, _, sec, _ in runner.action_times if k == kind) / micro
            for kind in "FBU"
        ) + (runner.recv_seconds / micro, runner.wait_seconds / micro)
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
            runners[name] = Ours(name, module, n, rank, args.transport, args.spin, args.fused)
        else:
            runners[name] = Theirs(name, module, n, rank, m, width)
    data = {name: (small if name == "pipedream" else batches) for name in methods}
    # warm-up: shapes, allocator, first-call costs
    for name in methods:
        runners[name].run(data[name][:2])
    # per round: the link of these two processes, over the transport our runtime chose
    ours = [r for r in runners.values() if isinstance(r, Ours)]
    engine: Any = ours[0].pipe._engine if ours else None  # DistributedRuntime
    wire = engine.transport if engine is not None else "process-group"
    args.wire = wire
    links: list[Link] = []
    rates: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[list[float]]] = {name: [] for name in methods}
    stage_times: list[list[Times]] = []  # per measurement, per rank
    alone_times: list[list[Times]] = []  # per round, per rank
    # per method, per round, per rank: (F, B, U) of every stage
    profiles: dict[str, list[list[Any]]] = {name: [] for name in methods if name in OURS}
    # per method, per round: each stage's (F, B, U) from a short run of the runtime
    run_profiles: dict[str, list[list[Any]]] = {name: [] for name in profiles}
    template: CostModel | None = None
    steady: dict[str, list[float]] = {name: [] for name in methods if name in OURS}
    # per method, per round, per rank: (F, B, U, receiving, of it waiting) seconds per
    # micro-batch in the run
    breakdowns: dict[str, list[list[Any]]] = {name: [] for name in methods if name in OURS}
    # per method, per round: the bound around its run (samples/s)
    bounds: dict[str, list[float]] = {name: [] for name in methods}
    # the same with each method's own arithmetic: F, its backwards (accumulating from the
    # second micro-batch of a mini-batch on) and its share of the update
    own_bounds: dict[str, list[float]] = {name: [] for name in methods}

    def isolated() -> list[Times]:
        """Both processes time their stage at once; each stage's times."""
        barrier_time()
        both: list[Any] = [None] * W
        dist.all_gather_object(both, isolated_stage_time(base, rank, m, width, args.bound_iters, n))
        stage_times.append(both)
        return both

    def alone() -> None:
        """Each process times its stage while the other waits at a barrier."""
        mine = None
        for s in range(W):
            barrier_time()
            if rank == s:
                mine = isolated_stage_time(base, rank, m, width, args.bound_iters, n)
        each: list[Any] = [None] * W
        dist.all_gather_object(each, mine)
        alone_times.append(each)

    for r in range(args.rounds):
        links.append(link_between(1 - rank, m * width * 4, first=rank == 0, transport=wire))
        alone()
        # the order turns every round, so that no method always runs first or last
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        # the bound is measured between every two runs (the machine's load drifts); a
        # run is held against the mean of the measurements just before and after it
        before = isolated()
        for name in order:
            if name in profiles:  # the simulator's profile right before the run it predicts
                barrier_time()  # both processes at once, like the runs
                nn_ = 1 if name == "pipedream" else n
                cm = profiled_costs(
                    stages, data[name][0], nn_, name, args.profile_warmup, args.profile_repeats
                )
                template = template or cm
                prof: list[Any] = [None] * W
                dist.all_gather_object(
                    prof, [(c.forward_time, c.backward_time, c.update_time) for c in cm.stages]
                )
                profiles[name].append(prof)
                # the same stages' actions as they take in the runtime: a short run
                k = args.profile_warmup + args.profile_repeats
                pipe = runners[name].pipe
                run_profiles[name].append(
                    pipe.time_actions(data[name][:k], skip=args.profile_warmup)
                )
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
            fb = [max(f + b for f, b, *_ in each) for each in (before, after)]
            bounds[name].append(m / (sum(fb) / 2))
            nn_ = 1 if name == "pipedream" else n
            own = [max(own_work(ts, nn_) for ts in each) for each in (before, after)]
            own_bounds[name].append(m / (sum(own) / 2))
            before = after
    if rank == 0:
        summary = report(args, stage_times, alone_times, bounds, own_bounds, rates, cpu, load)
        assert template is not None
        sims = predict(args, profiles, run_profiles, template, links, rates, steady)
        works = where_time_goes(args, stage_times, breakdowns, rates)
        # steady state against the bound: the bound's time for one mini-batch over the
        # measured interval between losses in the middle half (no fill or drain)
        for name in steady:
            nn_ = 1 if name == "pipedream" else n
            ratios = [nn_ * m / b / st for b, st in zip(bounds[name], steady[name])]
            works.setdefault(name, {})["steady_of_bound"] = statistics.median(ratios)
            own_ratios = [nn_ * m / b / st for b, st in zip(own_bounds[name], steady[name])]
            works[name]["steady_of_own"] = statistics.median(own_ratios)
        if args.result:
            for name, row in summary["methods"].items():
                row.update(sims.get(name, {}), **works.get(name, {}))
            Path(args.result).write_text(json.dumps(summary))
    dist.destroy_process_group()


def report(
    args: argparse.Namespace,
    stage_times: list[list[Times]],
    alone_times: list[list[Times]],
    bounds: dict[str, list[float]],
    own_bounds: dict[str, list[float]],
    rates: dict[str, list[float]],
    cpu: dict[str, list[list[float]]],
    load: float,
) -> dict[str, Any]:
    """The main table; returns the point's figures for the grid's summary."""
    m = args.micro_batch
    points = [m / max(f + b for f, b, *_ in both) for both in stage_times]
    # the bound alone, one measurement per round (round r pairs with every run of round r)
    alone_bound = [m / max(f + b for f, b, *_ in each) for each in alone_times]
    cpu_name = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu_name = next(
                ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    print(
        f"== throughput: W=2 stages, one process each; our transport {args.wire} "
        f"(--transport {args.transport}), torch's gloo on loopback =="
    )
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
    stage_rows = []
    for s in range(W):
        f, b, u, acc = (statistics.median(t[s][i] for t in stage_times) for i in range(4))
        fa, ba, ua = (statistics.median(t[s][i] for t in alone_times) for i in range(3))
        stage_rows.append(
            {"F": f, "B": b, "U": u, "B_acc": acc, "F_alone": fa, "B_alone": ba, "U_alone": ua}
        )
        print(
            f"stage {s}, both processes at once: F {f * 1e3:.2f} ms, B {b * 1e3:.2f} ms "
            f"(adding to gradients already there: {acc * 1e3:.2f}), U {u * 1e3:.2f} ms per "
            f"micro-batch; alone: F {fa * 1e3:.2f}, B {ba * 1e3:.2f}, U {ua * 1e3:.2f}"
        )
    print(
        f"bound m / max_s(F_s+B_s), measured before the first run and after every run: "
        f"median {statistics.median(points):,.0f} samples/s, range {min(points):,.0f} to "
        f"{max(points):,.0f} over {len(points)} measurements; alone (once a round): "
        + " ".join(f"{x:,.0f}" for x in alone_bound)
    )
    print(
        "each run is held against the mean of the two bound measurements around it; "
        "ratios are medians over rounds of per-round ratios; the order of the methods "
        "turns every round"
    )
    print()
    theirs = rates.get("torch-1F1B")
    print(
        f"{'method':<14}{'samples/s':>11}{'bound':>9}{'/ bound':>9}{'/ own':>7}{'/ alone':>9}"
        f"{'/ torch-1F1B':>14}{'CPU ms/mb s0, s1':>18}  samples/s per round"
    )
    methods: dict[str, dict[str, Any]] = {}
    for name, rs in rates.items():
        of_bound = statistics.median(r / b for r, b in zip(rs, bounds[name]))
        of_own = statistics.median(r / b for r, b in zip(rs, own_bounds[name]))
        # the rounds of one method: run r of every method falls in round r
        of_alone = statistics.median(r / a for r, a in zip(rs, alone_bound))
        ratio = statistics.median(r / q for r, q in zip(rs, theirs)) if theirs else None
        gp = rates.get("torch-GPipe")
        vs_gpipe = statistics.median(r / q for r, q in zip(rs, gp)) if gp else None
        vs = f"{ratio:.2f}x" if ratio is not None else "-"
        methods[name] = {
            "rate": statistics.median(rs),
            "of_bound": of_bound,
            "of_own_bound": of_own,
            "of_alone": of_alone,
            "vs_1f1b": ratio,
            "vs_gpipe": vs_gpipe,
        }
        rounds = " ".join(f"{x:,.0f}" for x in rs)
        used = ", ".join(
            f"{statistics.median(c[s] for c in cpu[name]) * 1e3:.1f}" for s in range(W)
        )
        print(
            f"{name:<14}{statistics.median(rs):>11,.0f}{statistics.median(bounds[name]):>9,.0f}"
            f"{of_bound:>9.2f}{of_own:>7.2f}{of_alone:>9.2f}{vs:>14}{used:>18}  {rounds}"
        )
    sys.stdout.flush()
    return {
        "width": args.width,
        "rows": m,
        "n": args.microbatches,
        "layers": args.layers,
        "minibatches": args.minibatches,
        "rounds": args.rounds,
        "stages": stage_rows,
        "bound": statistics.median(points),
        "bound_range": [min(points), max(points)],  # the machine's noise at this point
        "bound_alone": statistics.median(alone_bound),
        "load": [load, os.getloadavg()[0]],
        "methods": methods,
    }


def predict(
    args: argparse.Namespace,
    profiles: dict[str, list[list[Any]]],
    run_profiles: dict[str, list[list[Any]]],
    template: CostModel,
    links: list[Link],
    rates: dict[str, list[float]],
    steady: dict[str, list[float]],
) -> dict[str, dict[str, float]]:
    """The simulator's time per mini-batch next to the measured one, for each of our methods.

    Two predictions per round, from that round's profiles: the emulator's
    (``profile_stages``, as ``timeprest profile`` measures, with the link's
    per-message overhead) and the runtime's own actions in a short run just
    before (``Pipeline.time_actions``: sends and receives are in those times, so the
    link adds only its latency and bandwidth). Load drifting between rounds
    hits both sides of a ratio alike; the ratios reported are medians over
    rounds of the per-round ratios.
    """
    n, m, t = args.microbatches, args.micro_batch, args.minibatches
    print()
    print("== simulator vs runtime: time per mini-batch ==")
    print(
        "costs: profile_stages(method=...) times each method's own engine path (emulator, "
        "both processes at once, one thread each) in every round; stage s from rank s; "
        "run: Pipeline.time_actions, a short run of the runtime "
        f"({args.profile_warmup} mini-batches skipped, {args.profile_repeats} timed) right "
        "after, each rank its own stage, the waiting for messages left out"
    )
    print(
        f"link per round (timeprest.sim.link.link_between over {args.wire}, ping-pong of "
        "these two processes; "
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
        "of per-round ratios; run: the same from the runtime's action times (no overhead)"
    )
    print(
        f"{'method':<14}{'N':>3}{'T':>5}{'F,B,U s0 ms':>17}{'F,B,U s1 ms':>17}"
        f"{'predicted ms':>14}{'wall ms':>9}{'pred/wall':>11}{'steady ms':>11}{'pred/steady':>13}"
        f"{'run F,B,U s0':>15}{'run F,B,U s1':>15}{'run ms':>8}{'run/steady':>12}"
        "  pred/steady per round"
    )

    def fbu(rounds: list[Any], s: int, emulated: bool) -> str:
        """Stage s's median F, B, U in ms (the emulator's profile: as rank s measured it)."""
        at = [p[s][s] if emulated else p[s] for p in rounds]
        return ",".join(f"{statistics.median(v[i] for v in at) * 1e3:.2f}" for i in range(3))

    out: dict[str, dict[str, float]] = {}
    for name, rounds in profiles.items():
        nn_ = 1 if name == "pipedream" else n
        count = t * n // nn_  # mini-batches in a timed run
        preds: list[float] = []
        runs: list[float] = []
        for r, (prof, own) in enumerate(zip(rounds, run_profiles[name])):
            k = links[r]
            emulated = [prof[s][s] for s in range(W)]  # stage s as profiled by rank s
            for times, overhead, into in ((emulated, k.overhead, preds), (own, 0.0, runs)):
                costs = tuple(
                    replace(
                        template.stages[s],
                        forward_time=times[s][0],
                        backward_time=times[s][1],
                        update_time=times[s][2],
                    )
                    for s in range(W)
                )
                cm = replace(
                    template,
                    stages=costs,
                    latency=k.latency,
                    bandwidth=k.bandwidth,
                    overhead=overhead,
                )
                sim = simulate(name, W, nn_, count, cm, order_costs="default")
                into.append(sim.time_per_minibatch)
        # samples/s -> seconds per mini-batch of nn_ micro-batches
        walls = [nn_ * m / r for r in rates[name]]
        per_round = [p / st for p, st in zip(preds, steady[name])]
        run_round = [p / st for p, st in zip(runs, steady[name])]
        print(
            f"{name:<14}{nn_:>3}{count:>5}{fbu(rounds, 0, True):>17}{fbu(rounds, 1, True):>17}"
            f"{statistics.median(preds) * 1e3:>14.2f}{statistics.median(walls) * 1e3:>9.2f}"
            f"{statistics.median(p / w for p, w in zip(preds, walls)):>11.2f}"
            f"{statistics.median(steady[name]) * 1e3:>11.2f}{statistics.median(per_round):>13.2f}"
            f"{fbu(run_profiles[name], 0, False):>15}{fbu(run_profiles[name], 1, False):>15}"
            f"{statistics.median(runs) * 1e3:>8.2f}{statistics.median(run_round):>12.2f}"
            "  " + " ".join(f"{r:.2f}" for r in per_round)
        )
        out[name] = {
            "pred_steady": statistics.median(per_round),
            "pred_wall": statistics.median(p / w for p, w in zip(preds, walls)),
            "run_pred_steady": statistics.median(run_round),
        }
    sys.stdout.flush()
    return out


def where_time_goes(
    args: argparse.Namespace,
    stage_times: list[list[Times]],
    breakdowns: dict[str, list[list[Any]]],
    rates: dict[str, list[float]],
) -> dict[str, dict[str, float]]:
    """Each stage's actions in our runs, per micro-batch, next to its work in isolation."""
    m = args.micro_batch
    print()
    print("== where the time goes in our runs (ms per micro-batch, medians over rounds) ==")
    print(
        "F, B, U: this stage's actions as timed inside the run (F and B include waiting for "
        "a neighbour's message); waiting: the receives' share of F and B (as in every grid "
        "so far: the whole receive); recv own: of that, what is not waiting for the message "
        "to come (Transport.waited: reading its record, copying it out); work: "
        "F + B + U - waiting; / F+B+U: work over the isolated F + B (fresh gradients) + "
        "U x updates per micro-batch (1/N; pipedream 1), the issue's measure; / own: over "
        "the method's own arithmetic in isolation (backwards from a mini-batch's second "
        "micro-batch on add to the gradients); period: wall time per micro-batch of the run"
    )
    med = statistics.median
    times = [tuple(med(t[s][i] for t in stage_times) for i in range(4)) for s in range(W)]
    print(
        "isolated F + B + U, ms: "
        + ", ".join(f"stage {s} {sum(times[s][:3]) * 1e3:.2f}" for s in range(W))
    )
    print(
        f"{'method':<14}{'stage':>6}{'F':>8}{'B':>8}{'U':>7}{'waiting':>9}{'recv own':>10}"
        f"{'work':>8}"
        f"{'/ F+B+U':>9}{'/ own':>7}{'period':>8}"
    )
    out: dict[str, dict[str, float]] = {}
    for name, rounds in breakdowns.items():
        nn_ = 1 if name == "pipedream" else args.microbatches
        period = med(m / r for r in rates[name]) * 1e3
        out[name] = {"work_of_fbu": 0.0, "work_of_own": 0.0}
        for s in range(W):
            f, b, u, wait = (med(r[s][i] for r in rounds) * 1e3 for i in range(4))
            recv_own = med(r[s][3] - r[s][4] for r in rounds) * 1e3
            work = med((sum(r[s][:3]) - r[s][3]) for r in rounds) * 1e3
            fi, bi, ui, _ = times[s]
            fbu = (fi + bi + ui / nn_) * 1e3
            own = own_work(times[s], nn_) * 1e3  # type: ignore[arg-type]
            print(
                f"{name:<14}{s:>6}{f:>8.2f}{b:>8.2f}{u:>7.2f}{wait:>9.2f}{recv_own:>10.3f}"
                f"{work:>8.2f}"
                f"{work / fbu:>9.2f}{work / own:>7.2f}{period:>8.2f}"
            )
            out[name]["work_of_fbu"] = max(out[name]["work_of_fbu"], work / fbu)
            out[name]["work_of_own"] = max(out[name]["work_of_own"], work / own)
    sys.stdout.flush()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runnable(args: argparse.Namespace) -> None:
    """torch's Schedule1F1B needs N >= W: at N = 1 it is left out (and said so)."""
    methods = [s for s in args.methods.split(",") if s]
    if args.microbatches < W and "torch-1F1B" in methods:
        print(f"torch-1F1B left out: torch's Schedule1F1B needs N >= W = {W}")
        args.methods = ",".join(x for x in methods if x != "torch-1F1B")


def grid(args: argparse.Namespace) -> None:
    """Every point of the grid in its own pair of processes, then the summary."""
    torch.set_num_threads(args.threads)
    chosen = [int(i) for i in args.grid_points.split(",") if i] or range(len(_grid.GRID))
    print(f"== throughput grid: {len(list(chosen))} points, W = {W} ==")
    print(_grid.environment(args.threads))
    print("command: python " + " ".join(sys.argv))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in chosen:
            point = _grid.GRID[i]
            fb = _grid.estimate_fb(point.width, args.layers, point.rows)
            a = copy.copy(args)
            a.width, a.micro_batch, a.microbatches = point
            a.minibatches = _grid.minibatches_for(fb, point.n)
            a.rounds = args.grid_rounds
            a.bound_iters = _grid.clamp(0.25 / fb, 4, 25)
            per_profile = 2 * point.n * fb  # one mini-batch of both stages in one process
            # the warm-up covers the pipeline's fill (W mini-batches): i-timeprest's first
            # blended backwards at 2048/256/2 took 3-6x the steady ones
            a.profile_warmup = W
            a.profile_repeats = _grid.clamp(0.3 / per_profile, 3, 6)
            a.result = os.path.join(tmp, f"{i}.json")
            print(
                f"\n######## point {i}: width {point.width}, {point.rows} rows, N = {point.n} "
                f"(F + B estimated {fb * 1e3:.1f} ms; {a.minibatches} mini-batches per run, "
                f"{a.bound_iters} samples per bound, profile {a.profile_warmup}+"
                f"{a.profile_repeats}) ########"
            )
            runnable(a)
            sys.stdout.flush()
            started = time.perf_counter()
            mp.spawn(worker, args=(a, free_port()), nprocs=W, join=True)
            row = json.loads(Path(a.result).read_text())
            row["seconds"] = time.perf_counter() - started
            print(f"(point {i}: {row['seconds']:.0f} s)")
            results.append(row)
    grid_summary(args, results)


ASYNC = ("pipedream", "v-timeprest", "i-timeprest")
"""The methods the bound and work targets are about."""


# the simulator's two predictions (see predict): (key, field of a grid cell, text)
SIM_TARGETS = (
    ("sim", "pred_steady", "simulator within 15 % (sim / steady)"),
    ("sim_run", "run_pred_steady", "  the same from the runtime's own action times (run / steady)"),
)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """A grid read against issue 11's targets: per target, the cells that meet it out of
    those it applies to, and the misses. The bound and work targets apply to the
    asynchronous methods where one micro-batch's F + B takes >= 5 ms; each is also read
    against the method's own arithmetic (backwards that add into the gradients, its share
    of the update), and ``own / bound`` is that arithmetic's bound over the F + B bound:
    the most of the F + B bound a run can reach without doing less arithmetic."""
    checks: dict[str, tuple[str, list[str]]] = {}  # key: (text, one entry per cell, "" if met)

    def check(key: str, text: str, ok: bool, cell: str) -> None:
        checks.setdefault(key, (text, []))[1].append("" if ok else cell)

    def at(name: str, tag: str, v: float) -> str:
        return f"{name} at {tag} {v:.2f}"

    for p in results:
        tag = f"{p['width']}/{p['rows']}/{p['n']}"
        big = max(s["F"] + s["B"] for s in p["stages"]) >= 5e-3
        bubble = (W - 1) / (p["n"] + W - 1)
        for name, r in p["methods"].items():
            if name.startswith("torch"):
                continue
            for key, field, text in SIM_TARGETS:
                if r.get(field) is not None:
                    v = r[field]
                    check(key, text, abs(v - 1) <= 0.15, at(name, tag, v))
            if name not in ASYNC:
                continue
            if r.get("vs_1f1b") is not None:
                v = r["vs_1f1b"]
                check("1f1b", "never below Schedule1F1B", v >= 1.0, at(name, tag, v))
                if bubble >= 1 / 3 - 1e-9:
                    check(
                        "bubble",
                        ">= 1.1x Schedule1F1B where its bubble >= 1/3",
                        v >= 1.1,
                        at(name, tag, v),
                    )
            if big and r.get("steady_of_bound") is not None:
                v = r["steady_of_bound"]
                check("bound", ">= 0.95 of the F + B bound (steady)", v >= 0.95, at(name, tag, v))
                v = r["steady_of_own"]
                check("own", "  the same against the own arithmetic", v >= 0.95, at(name, tag, v))
                v = r["of_bound"] / r["of_own_bound"]
                check("ceiling", "  own / bound >= 0.95 (reachable)", v >= 0.95, at(name, tag, v))
                v = r["work_of_fbu"]
                check("work", "work <= 1.05x the concurrent F + B + U", v <= 1.05, at(name, tag, v))
                v = r["work_of_own"]
                check(
                    "work_own", "  the same against the own arithmetic", v <= 1.05, at(name, tag, v)
                )
    lines = []
    order = ("1f1b", "bubble", "bound", "own", "ceiling", "work", "work_own", "sim", "sim_run")
    for key in (k for k in order if k in checks):
        text, cells = checks[key]
        misses = [c for c in cells if c]
        lines.append(f"{text}: {len(cells) - len(misses)} of {len(cells)}")
        if misses:
            lines.append("    misses: " + "; ".join(misses))
    return lines


def grid_summary(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    fmt = _grid.fmt
    methods = [s for s in args.methods.split(",") if s]
    header = ["width", "rows", "N", "bubble", "F+B ms", "F+B alone ms", "bound spread", "method"]
    header += ["/ Schedule1F1B", "/ ScheduleGPipe", "/ bound", "/ bound alone", "steady / bound"]
    header += ["/ own bound", "steady / own", "work / F+B+U", "work / own", "sim / steady"]
    header += ["run / steady"]
    rows = []
    for p in results:
        fb = max(s["F"] + s["B"] for s in p["stages"]) * 1e3
        fb_alone = max(s["F_alone"] + s["B_alone"] for s in p["stages"]) * 1e3
        bubble = (W - 1) / (p["n"] + W - 1)
        lo, hi = p.get("bound_range", (None, None))
        spread = fmt(hi / lo) if lo else "-"
        for name in methods:
            r = p["methods"].get(name)
            if r is None:
                continue
            rows.append(
                [str(p["width"]), str(p["rows"]), str(p["n"]), fmt(bubble), fmt(fb, 1)]
                + [fmt(fb_alone, 1), spread, name, fmt(r["vs_1f1b"]), fmt(r["vs_gpipe"])]
                + [fmt(r["of_bound"]), fmt(r["of_alone"]), fmt(r.get("steady_of_bound"))]
                + [fmt(r.get("of_own_bound")), fmt(r.get("steady_of_own"))]
                + [fmt(r.get("work_of_fbu"))]
                + [fmt(r.get("work_of_own")), fmt(r.get("pred_steady"))]
                + [fmt(r.get("run_pred_steady"))]
            )
    print("\n== throughput grid: summary ==")
    print(
        f"{args.layers} x Linear(width)+ReLU per stage, W = {W}, our transport "
        f"--transport {args.transport}, torch's gloo on loopback, "
        f"{args.grid_rounds} rounds per point, medians of per-round ratios; bound = rows / "
        "max_s(F_s + B_s), both processes computing (F, B and an SGD step) at once; alone: "
        "one process at a time; steady / bound: the bound's time per mini-batch over the "
        "measured interval between losses in the run's middle half (no fill or drain); "
        "/ own bound: against rows / max_s of the method's own arithmetic (F, backwards "
        "adding to the gradients from a mini-batch's second micro-batch on, 1/N of the "
        "update; pipedream: all of it), measured the same way; steady / own: the steady "
        "interval against it; work / F+B+U: the larger "
        "stage's work per micro-batch in the run over its concurrent F + B + U x updates "
        "per micro-batch; work / own: over that own arithmetic; sim / steady: the simulator's time per mini-batch "
        "(from the emulator's profile) over the measured steady one; run / steady: the same "
        "from the runtime's own action times in a short run; bubble: Schedule1F1B's (W-1)/(N+W-1); bound spread: "
        "the largest over the smallest of the point's bound measurements (this machine's "
        "noise there: ratios that differ from a target by less are no verdict)"
    )
    print(_grid.plain(header, rows))
    reading = targets(results)
    print("\n== against issue 11's targets (F + B >= 5 ms for the bound and work) ==")
    print("\n".join(reading))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput-grid.json").write_text(json.dumps(results, indent=1))
    (out / "throughput-grid.md").write_text(
        f"{_grid.environment(args.threads)}\n\n"
        + f"command: `python {' '.join(sys.argv)}`\n\n"
        + _grid.markdown(header, rows)
        + "\n\nAgainst issue 11's targets:\n\n"
        + "\n".join(" " * (len(ln) - len(ln.lstrip())) + f"- {ln.strip()}" for ln in reading)
        + "\n"
    )
    plot(results, methods, out / "throughput-grid.png")
    print(f"wrote {out / 'throughput-grid.md'}, {out / 'throughput-grid.png'}")


def plot(results: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    """Two panels, one group of bars per point: ratio to Schedule1F1B, ratio to the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['width']}/{p['rows']}/N{p['n']}" for p in results]
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    width = 0.8 / len(methods)
    for ax, key, title, line in (
        (axes[0], "vs_1f1b", "throughput / torch Schedule1F1B", 1.0),
        (axes[1], "of_bound", "throughput / concurrent bound rows / max_s(F_s+B_s)", 0.95),
    ):
        for k, name in enumerate(methods):
            ys = [(p["methods"].get(name) or {}).get(key) for p in results]
            xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(results))]
            ax.bar(
                [x for x, y in zip(xs, ys) if y is not None],
                [y for y in ys if y is not None],
                width,
                label=name,
            )
        ax.axhline(line, color="k", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(methods), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    axes[1].set_xticks(range(len(results)), labels, rotation=30, fontsize=8)
    axes[1].set_xlabel("width / micro-batch rows / N (W = 2); N = 1: no Schedule1F1B")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse()
    if args.targets:
        try:
            results = json.loads(Path(args.targets).read_text())
            reading = targets(results)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"--targets {args.targets}: not a saved grid ({exc})") from None
        print(f"== {args.targets} against issue 11's targets ==")
        print("\n".join(reading))
        return
    if args.grid:
        grid(args)
        return
    runnable(args)
    mp.spawn(worker, args=(args, free_port()), nprocs=W, join=True)


if __name__ == "__main__":
    main()
