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
from timeprest.errors import MultipleSequenceWarning
from timeprest.policy.methods import METHODS

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


class PlainStages:
    """A plain loop over the stages as separate graphs, as any pipeline must run them: each
    stage's forward on the previous one's detached output, each stage's backward by its own
    ``autograd.grad``, gradients accumulated by hand, one optimizer per stage (as every
    stage of a pipeline has its own); no versions, hooks or schedule. The
    engine's cost over this loop is the engine's own; this loop's over :class:`Plain` is
    the cost of cutting the model into stages."""

    def __init__(self, stages: list[nn.Module], n: int) -> None:
        self.stages = copy.deepcopy(stages)
        self.params = [list(m.parameters()) for m in self.stages]
        self.opts = [sgd(ps) for ps in self.params]
        self.n = n

    def __call__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in batches:
            for xj, yj in zip(torch.tensor_split(x, self.n), torch.tensor_split(y, self.n)):
                inputs, outputs, h = [], [], xj.clone()
                for s, m in enumerate(self.stages):
                    h_in = h.detach().requires_grad_(s > 0)
                    h = m(h_in)
                    inputs.append(h_in)
                    outputs.append(h)
                loss = nn.functional.mse_loss(h, yj.clone()) * (xj.shape[0] / x.shape[0])
                float(loss.detach())
                grad: Tensor | None = None
                for s in reversed(range(len(self.stages))):
                    root = loss if grad is None else outputs[s]
                    want = self.params[s] + ([inputs[s]] if s > 0 else [])
                    res = torch.autograd.grad(root, want, grad_outputs=grad)
                    for p, g in zip(self.params[s], res):
                        p.grad = g if p.grad is None else p.grad.add_(g)
                    grad = res[-1] if s > 0 else None
            for opt in self.opts:
                opt.step()
                opt.zero_grad(set_to_none=True)


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
        "stages as separate graphs (the engine's own cost)"
    )
    print(
        f"{'method':<14}{'plain ms/mb':>12}{'engine ms/mb':>14}{'ratio':>8}{'per-stage':>11}"
        "  ratio per round"
    )
    for method in methods:
        p, e = times[f"plain/{method}"], times[method]
        ratios = [b / a for a, b in zip(p, e)]
        staged = [b / a for a, b in zip(times[f"stages/{method}"], e)]
        print(
            f"{method:<14}{statistics.median(p) / micro * 1e3:>12.2f}"
            f"{statistics.median(e) / micro * 1e3:>14.2f}{statistics.median(ratios):>8.3f}"
            f"{statistics.median(staged):>11.3f}  " + " ".join(f"{r:.3f}" for r in ratios)
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
    stage_rows: list[list[str]] = []
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
        cells, staged_cells = [], []
        for method in methods:
            ratios = [e / p for p, e in zip(times[f"plain/{method}"], times[method])]
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
            staged = [e / p for p, e in zip(times[f"stages/{method}"], times[method])]
            staged_cells.append(f"{statistics.median(staged):.2f}")
        plain_ms = statistics.median(times[f"plain/{methods[0]}"]) / micro * 1e3
        rows.append([str(point.width), str(point.rows), str(point.n), f"{plain_ms:.2f}", *cells])
        stage_rows.append([str(point.width), str(point.rows), str(point.n), *staged_cells])
        print(
            f"point {i}: width {point.width}, {point.rows} rows, N = {point.n}, "
            f"{micro} micro-batches per run ({time.perf_counter() - started:.0f} s): "
            + ", ".join(f"{m} {c}" for m, c in zip(methods, cells)),
            flush=True,
        )
    print()
    print(_grid.plain(header, rows))
    print("\nengine / a plain loop over the stages as separate graphs (median of rounds):")
    print(_grid.plain(stage_header, stage_rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine-grid.md").write_text(
        f"{_grid.environment(args.threads)}\n\ncommand: `python {' '.join(sys.argv)}`\n\n"
        "Engine / plain loop (one graph), median of per-round ratios (min-max):\n\n"
        + _grid.markdown(header, rows)
        + "\n\nEngine / a plain loop over the stages as separate graphs (the engine's own "
        "cost; median of per-round ratios):\n\n" + _grid.markdown(stage_header, stage_rows)
    )
    print(f"wrote {out / 'engine-grid.md'}")


if __name__ == "__main__":
    main()
