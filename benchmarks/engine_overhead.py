"""What the engine costs on top of plain autograd, per method, in one process.

The emulator runs every stage in this process, one action after another, so
its time per micro-batch is the model's forward, backward and update plus
whatever the engine adds: weight versions (stash copies, the intermediate
weight), the saved-tensor hooks, ``functional_call``, the relative-distance
report, the schedule walk and the mailbox. A plain training loop over the
same micro-batches (forward, backward, one optimizer step per mini-batch;
for ``pipedream`` one per micro-batch, as that method updates) does the
same arithmetic without any of it. Both run interleaved over several rounds
on copies of the same weights; the ratio engine / plain is reported per
round and as a median.

Two more plain loops split that ratio into its parts: the same loop over
the stages as separate graphs (``PlainStages``: what cutting the model into
stages costs by itself), and that loop run in the order the emulator runs
the method's actions (``PlainOrdered``: what the method's order costs, for
example a run of one stage's forwards against alternating stages; the
engine against it is the engine's own cost with the order held equal).

Run::

    python benchmarks/engine_overhead.py
    python benchmarks/engine_overhead.py --stages 4 --width 256 --micro-batch 128
    python benchmarks/engine_overhead.py --grid --out docs/results/grid   # issue 11's grid

``--grid`` measures every point of ``benchmarks/_grid.py`` (W = 2, the
methods of the throughput grid, ``--grid-rounds`` rounds, runs sized to the
point's cost) and prints and writes a summary table (markdown) to ``--out``.

One intra-op thread by default (as the distributed runtime uses per
process); on a shared machine look at the per-round ratios, not at one.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import timeprest
from timeprest.engine.executor import StageExecutor
from timeprest.engine.mailbox import CheckingMailbox, drive
from timeprest.errors import MultipleSequenceWarning
from timeprest.policy.methods import METHODS
from timeprest.schedule import build_schedule
from timeprest.schedule.lower import lower
from timeprest.stage import NoBatches

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _grid  # noqa: E402  (the grid shared with throughput.py)

GRID_METHODS = ("gpipe", "1f1b", "pipedream", "v-timeprest", "i-timeprest")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2, help="W")
    p.add_argument("--width", type=int, default=512, help="features of every layer")
    p.add_argument("--layers", type=int, default=3, help="Linear+ReLU layers per stage")
    p.add_argument("--micro-batch", type=int, default=256, help="rows per micro-batch")
    p.add_argument("--microbatches", type=int, default=2, help="N (pipedream: always 1)")
    p.add_argument("--minibatches", type=int, default=24, help="mini-batches per timed run")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads")
    p.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    p.add_argument(
        "--no-fused-accumulation",
        dest="fused",
        action="store_false",
        help="the engine with Pipeline(fused_accumulation=False) (for the A/B)",
    )
    p.add_argument("--grid", action="store_true", help="run the grid of benchmarks/_grid.py")
    p.add_argument("--grid-rounds", type=int, default=3, help="rounds per grid point")
    p.add_argument(
        "--grid-points", default="", help="comma-separated indices into the grid (default: all)"
    )
    p.add_argument("--out", default="results/engine-grid", help="grid: the markdown table here")
    args = p.parse_args()
    if not args.methods:
        args.methods = ",".join(GRID_METHODS if args.grid else METHODS)
    return args


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-4)


class Plain:
    """A plain loop: N micro-batches accumulated, then one step, per mini-batch."""

    def __init__(self, stages: list[nn.Module], n: int) -> None:
        self.model = nn.Sequential(*copy.deepcopy(stages))
        self.opt = sgd(list(self.model.parameters()))
        self.n = n

    def __call__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in batches:
            for xj, yj in zip(torch.tensor_split(x, self.n), torch.tensor_split(y, self.n)):
                out = self.model(xj.clone())
                loss = nn.functional.mse_loss(out, yj.clone()) * (xj.shape[0] / x.shape[0])
                loss.backward()
                float(loss.detach())
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


Computation = tuple[str, int, int, int | None]
"""``(kind, stage, mini-batch, micro-batch)`` of one F, B or U (U: micro-batch None)."""


def microbatch_order(stages: int, n: int, count: int) -> list[Computation]:
    """A plain loop's order: each micro-batch forward through every stage and back, a
    mini-batch's N of them, then every stage's update."""
    order: list[Computation] = []
    for t in range(count):
        for j in range(n):
            order += [("F", s, t, j) for s in range(stages)]
            order += [("B", s, t, j) for s in reversed(range(stages))]
        order += [("U", s, t, None) for s in range(stages)]
    return order


class PlainStages:
    """A plain loop over the stages as separate graphs, as any pipeline must run them: each
    stage's forward on the previous one's detached output, each stage's backward by its own
    ``autograd.backward`` with ``inputs`` (the call the engine makes), gradients added into
    ``.grad`` by autograd, one optimizer per stage (as every stage of a pipeline has its
    own); no versions, hooks or schedule. The engine's cost over this loop is the engine's
    own; this loop's over :class:`Plain` is the cost of cutting the model into stages.
    Its computations run in :func:`microbatch_order`; :class:`PlainOrdered` runs the same
    loop in the emulator's.

    (Until the tenth grid this loop called ``autograd.grad`` and added the gradients by
    hand: about 10 % slower at 256/16/8, which made the engine's own cost look smaller.)"""

    def __init__(self, stages: list[nn.Module], n: int) -> None:
        self.stages = copy.deepcopy(stages)
        self.params = [list(m.parameters()) for m in self.stages]
        self.opts = [sgd(ps) for ps in self.params]
        self.n = n
        self._orders: dict[int, list[Computation]] = {}

    def order(self, count: int) -> list[Computation]:
        """The computations of ``count`` mini-batches, in the order this loop runs them."""
        if count not in self._orders:
            self._orders[count] = microbatch_order(len(self.stages), self.n, count)
        return self._orders[count]

    def __call__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        last = len(self.stages) - 1
        split = [
            (torch.tensor_split(x, self.n), torch.tensor_split(y, self.n), x.shape[0])
            for x, y in batches
        ]
        inputs: dict[tuple[int, int, int], Tensor] = {}
        outputs: dict[tuple[int, int, int], Tensor] = {}
        grads: dict[tuple[int, int, int], Tensor] = {}
        for kind, s, t, j in self.order(len(batches)):
            if kind == "U":
                self._update(s, live=any(k[0] == s for k in outputs))
                continue
            assert j is not None
            key = (s, t, j)
            if kind == "F":
                xs, ys, rows = split[t]
                h_in = xs[j].clone() if s == 0 else outputs[(s - 1, t, j)].detach()
                h = self.stages[s](h_in.requires_grad_(s > 0))
                if s == last:
                    h = nn.functional.mse_loss(h, ys[j].clone()) * (xs[j].shape[0] / rows)
                    float(h.detach())
                inputs[key], outputs[key] = h_in, h
            else:
                h_in, out = inputs.pop(key), outputs.pop(key)
                want = self.params[s] + ([h_in] if s > 0 else [])
                torch.autograd.backward(out, grad_tensors=grads.pop(key, None), inputs=want)
                if s > 0:
                    grads[(s - 1, t, j)] = h_in.grad  # type: ignore[assignment]

    def _update(self, s: int, live: bool) -> None:
        """Stage s's SGD step; under a live graph (a forward whose backward comes after this
        update) out of place: the new weights go to new memory and the graph keeps the
        old ones, the least weight stashing costs (no copy)."""
        opt = self.opts[s]
        if not live:
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        lr = opt.param_groups[0]["lr"]
        with torch.no_grad():
            for p in self.params[s]:
                if p.grad is not None:
                    p.data = torch.add(p.detach(), p.grad, alpha=-lr)
                    p.grad = None


class _Recorder:
    """Stands in for a stage's runner under the emulator's own executor and drive: it
    computes nothing and records the computations it is asked for, in order."""

    action_times = None  # the executor times receives only when asked

    def __init__(self, index: int, order: list[Computation]) -> None:
        self.index = index
        self.order = order
        self._token = torch.empty(0)  # what its sends carry

    def update_ready(self, t: int) -> bool:
        return True

    def begin_action(self, index: int, action: Any) -> None:
        pass

    def end_action(self, index: int, action: Any) -> None:
        pass

    def forward(self, t: int, j: int, received: Any, batches: Any) -> Tensor:
        self.order.append(("F", self.index, t, j))
        return self._token

    def backward(self, t: int, j: int, grad: Any) -> Tensor:
        self.order.append(("B", self.index, t, j))
        return self._token

    def update(self, index: int, t: int) -> None:
        self.order.append(("U", self.index, t, None))


def emulator_order(method: str, stages: int, n: int, count: int) -> list[Computation]:
    """Every computation of ``count`` mini-batches of ``method``, in the order the emulator
    runs them: its lowered programs through its own executor and drive, on runners that
    only record."""
    kind = METHODS[method].schedule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        lowered = lower(build_schedule(kind, stages, n, count, warn=False))
    order: list[Computation] = []
    mailbox = CheckingMailbox(lowered.schedule.backward_unit)
    executors = [
        StageExecutor(ops, _Recorder(s, order), mailbox, NoBatches())  # type: ignore[arg-type]
        for s, ops in enumerate(lowered.programs)
    ]
    drive(executors, [mailbox])
    return order


class PlainOrdered(PlainStages):
    """The per-stage plain loop, with every F, B and U run in the order the emulator runs
    the method's (:func:`emulator_order`) and no version bookkeeping: what the method's
    order costs by itself. (Its numbers are not the method's: a backward reads the
    weights its forward read, whatever the method's policy.) At the small shapes the
    order matters: alternating between the stages' weights misses in the cache where a
    run of one stage's forwards does not."""

    def __init__(self, stages: list[nn.Module], n: int, method: str, count: int) -> None:
        super().__init__(stages, n)
        self._orders = {count: emulator_order(method, len(stages), n, count)}

    def order(self, count: int) -> list[Computation]:
        assert count in self._orders, "built for another number of mini-batches"
        return self._orders[count]


class Engine:
    """The emulator, built once (its schedule is cached after the warm-up call)."""

    fused = True  # Pipeline(fused_accumulation=...), from --no-fused-accumulation

    def __init__(self, stages: list[nn.Module], n: int, method: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MultipleSequenceWarning)
            self.pipe = timeprest.Pipeline(
                copy.deepcopy(stages),
                method=method,
                num_microbatches=n,
                optimizer=sgd,
                loss_fn=nn.functional.mse_loss,
                fused_accumulation=Engine.fused,
            )

    def __call__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.pipe.train(batches)


def measure(args: argparse.Namespace, methods: list[str]) -> dict[str, list[float]]:
    """Seconds of every timed run: ``plain/<method>`` and ``<method>``, one per round."""
    torch.manual_seed(0)
    w, m = args.width, args.micro_batch
    base: list[nn.Module] = [
        nn.Sequential(*[x for _ in range(args.layers) for x in (nn.Linear(w, w), nn.ReLU())])
        for _ in range(args.stages)
    ]
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> list[tuple[Tensor, Tensor]]:
        t = args.minibatches * args.microbatches // n  # as many micro-batches for every method
        return [(torch.randn(n * m, w, generator=g), torch.randn(n * m, w, generator=g))] * t

    runs: dict[str, tuple[Callable[[list[tuple[Tensor, Tensor]]], None], list[Any]]] = {}
    for method in methods:
        n = 1 if method == "pipedream" else args.microbatches
        batches = data(n)
        runs[f"plain/{method}"] = (Plain(base, n), batches)
        runs[f"stages/{method}"] = (PlainStages(base, n), batches)
        runs[f"ordered/{method}"] = (PlainOrdered(base, n, method, len(batches)), batches)
        runs[method] = (Engine(base, n, method), batches)
    for fn, batches in runs.values():  # warm-up: allocator, first calls, the schedule
        fn(batches)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, (fn, batches) in runs.items():  # each method right after its plain peer
            t0 = time.perf_counter()
            fn(batches)
            times[k].append(time.perf_counter() - t0)
    return times


RATIOS: dict[str, tuple[str, str]] = {
    "ratio": ("", "plain/"),
    "per-stage": ("", "stages/"),
    "cut": ("stages/", "plain/"),
    "ordered": ("", "ordered/"),
    "order": ("ordered/", "stages/"),
}
"""Each reported ratio as (run over, run under), by the prefix of :func:`measure`'s keys
(the empty prefix is the engine)."""

BREAKDOWNS = (
    (
        "per-stage",
        "engine / a plain loop over the stages as separate graphs (median of rounds):",
        "Engine / a plain loop over the stages as separate graphs (the engine's own cost; "
        "median of per-round ratios):",
    ),
    (
        "cut",
        "the per-stage loop / the one-graph loop (the cut by itself; median of rounds):",
        "The plain loop over separate stage graphs / the one-graph loop (what cutting the "
        "model into stages costs by itself, with each method's N; median of per-round "
        "ratios):",
    ),
    (
        "ordered",
        "engine / the per-stage loop in the emulator's order (the engine's own cost):",
        "Engine / the per-stage loop run in the order the emulator runs the method's "
        "actions, no version bookkeeping (the engine's own cost with the order held equal; "
        "median of per-round ratios):",
    ),
    (
        "order",
        "the per-stage loop in the emulator's order / in per-micro-batch order:",
        "The per-stage loop in the emulator's order / the same loop in per-micro-batch "
        "order (what the method's order costs by itself; median of per-round ratios):",
    ),
)
"""The grid's tables after the first: the ratio, its title printed and in markdown."""


def per_round(times: dict[str, list[float]], method: str, ratio: str) -> list[float]:
    """One of :data:`RATIOS` for ``method``, round by round."""
    over, under = RATIOS[ratio]
    return [a / b for a, b in zip(times[over + method], times[under + method])]


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    Engine.fused = args.fused
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.grid:
        grid(args, methods)
        return
    times = measure(args, methods)
    w, m = args.width, args.micro_batch
    micro = args.minibatches * args.microbatches
    print("== engine overhead: emulator vs a plain training loop, one process ==")
    print(
        f"torch {torch.__version__}, timeprest {timeprest.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} cores, {args.threads} intra-op thread(s), "
        f"load average {os.getloadavg()[0]:.2f} at the end"
    )
    print(
        f"model: W={args.stages} stages of {args.layers} x Linear({w},{w})+ReLU, float32, SGD; "
        f"micro-batch {m} rows, N={args.microbatches} (pipedream: 1), {micro} micro-batches "
        f"per timed run, {args.rounds} rounds; ratio = engine / plain, median of per-round ratios"
    )
    print(
        "ratio: engine / plain loop (one graph); per-stage: engine / a plain loop over the "
        "stages as separate graphs; cut: that loop / the one-graph loop (what cutting the "
        "model into stages costs by itself); ordered: engine / that loop run in the order the "
        "emulator runs the method's actions (the engine's own cost, the order held equal); "
        "order: the ordered loop / the per-stage loop (what the method's order costs)"
    )
    print(
        f"{'method':<14}{'plain ms/mb':>12}{'engine ms/mb':>14}{'ratio':>8}{'per-stage':>11}"
        f"{'cut':>7}{'ordered':>9}{'order':>7}  ratio per round"
    )
    for method in methods:
        p, e = times[f"plain/{method}"], times[method]
        r = {name: statistics.median(per_round(times, method, name)) for name in RATIOS}
        print(
            f"{method:<14}{statistics.median(p) / micro * 1e3:>12.2f}"
            f"{statistics.median(e) / micro * 1e3:>14.2f}{r['ratio']:>8.3f}"
            f"{r['per-stage']:>11.3f}{r['cut']:>7.3f}{r['ordered']:>9.3f}{r['order']:>7.3f}  "
            + " ".join(f"{x:.3f}" for x in per_round(times, method, "ratio"))
        )


def grid(args: argparse.Namespace, methods: list[str]) -> None:
    """Every point of the grid at W = 2, then one table of ratios (method x point)."""
    chosen = [int(i) for i in args.grid_points.split(",") if i] or range(len(_grid.GRID))
    print("== engine overhead grid: emulator vs a plain loop, one process, W = 2 ==")
    print(_grid.environment(args.threads))
    print("command: python " + " ".join(sys.argv))
    print(
        f"{args.layers} x Linear(width)+ReLU per stage, SGD; {args.grid_rounds} rounds per "
        "point; ratio = engine / plain loop, median of per-round ratios (min-max in brackets)"
    )
    header = ["width", "rows", "N", f"plain ms/mb ({methods[0]})", *methods]
    stage_header = ["width", "rows", "N", *methods]
    rows: list[list[str]] = []
    tables: dict[str, list[list[str]]] = {name: [] for name, _, _ in BREAKDOWNS}
    for i in chosen:
        point = _grid.GRID[i]
        a = copy.copy(args)
        a.stages = 2
        a.width, a.micro_batch, a.microbatches = point
        fb = 2 * _grid.estimate_fb(point.width, args.layers, point.rows)  # both stages
        a.minibatches = _grid.minibatches_for(fb, point.n, seconds=0.4)
        a.rounds = args.grid_rounds
        started = time.perf_counter()
        times = measure(a, methods)
        micro = a.minibatches * a.microbatches
        cells = []
        for method in methods:
            ratios = per_round(times, method, "ratio")
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        where = [str(point.width), str(point.rows), str(point.n)]
        plain_ms = statistics.median(times[f"plain/{methods[0]}"]) / micro * 1e3
        rows.append([*where, f"{plain_ms:.2f}", *cells])
        for name, table in tables.items():
            medians = (statistics.median(per_round(times, m, name)) for m in methods)
            table.append([*where, *(f"{x:.2f}" for x in medians)])
        print(
            f"point {i}: width {point.width}, {point.rows} rows, N = {point.n}, "
            f"{micro} micro-batches per run ({time.perf_counter() - started:.0f} s): "
            + ", ".join(f"{m} {c}" for m, c in zip(methods, cells)),
            flush=True,
        )
    print()
    print(_grid.plain(header, rows))
    for name, title, _ in BREAKDOWNS:
        print(f"\n{title}")
        print(_grid.plain(stage_header, tables[name]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine-grid.md").write_text(
        f"{_grid.environment(args.threads)}\n\ncommand: `python {' '.join(sys.argv)}`\n\n"
        "Engine / plain loop (one graph), median of per-round ratios (min-max):\n\n"
        + _grid.markdown(header, rows)
        + "".join(
            f"\n\n{md}\n\n" + _grid.markdown(stage_header, tables[name])
            for name, _, md in BREAKDOWNS
        )
    )
    print(f"wrote {out / 'engine-grid.md'}")


if __name__ == "__main__":
    main()
