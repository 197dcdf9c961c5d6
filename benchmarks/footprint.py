"""What holding more than one copy of a stage's weights costs in time, with no engine at all.

Weight stashing (pipedream) keeps the version a forward read until its backward, so a
stage's forward reads one copy of the weights and its backward another. On a CPU whose
caches hold one copy but not two, that alone makes every action slower. This script
measures it: two processes at once (as the two ranks of a W = 2 run), each a loop of
forward, backward and SGD update over ``--layers`` Linear+ReLU layers in plain torch,
with the forward reading copy ``i mod K`` and the backward copy ``i + 1 mod K`` of the
weights, for K = 1, 2, 3 copies. Same arithmetic for every K; the ratio to K = 1 is the
cost of the footprint. The larger process's time per iteration counts, interleaved over
``--rounds`` rounds.

Run::

    python benchmarks/footprint.py
    python benchmarks/footprint.py --shapes 1024x32,512x128,2048x16 --seconds 2 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _grid  # noqa: E402  (the environment line shared with the other benchmarks)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes",
        default="1024x32,512x128,2048x16",
        help="comma-separated WIDTHxROWS (layer width, rows per micro-batch)",
    )
    p.add_argument("--layers", type=int, default=3, help="Linear+ReLU layers")
    p.add_argument("--copies", default="1,2,3", help="comma-separated numbers of weight copies")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per run")
    p.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    args = p.parse_args()
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
        args.copies = [int(c) for c in args.copies.split(",") if c]
    except ValueError:
        p.error("--shapes takes WIDTHxROWS,... and --copies integers")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes) or not args.copies:
        p.error("--shapes takes WIDTHxROWS,... with positive numbers")
    if min(args.copies) < 1 or args.layers < 1 or args.seconds <= 0 or args.rounds < 1:
        p.error("--copies, --layers, --seconds and --rounds must be positive")
    if 1 not in args.copies:
        p.error("--copies must include 1 (the ratios are to one copy)")
    args.copies = sorted(set(args.copies))
    return args


def loop(width: int, rows: int, layers: int, copies: int, seconds: float, out: mp.Queue) -> None:
    """One process: forward on one copy, backward on the next, update; seconds per iteration."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = [[torch.randn(width, width) * 0.01 for _ in range(layers)] for _ in range(copies)]
    bias = [torch.zeros(width) for _ in range(layers)]
    x = torch.randn(rows, width)
    i, n, t0 = 0, 0, 0.0
    while True:
        fw, bw = weights[i % copies], weights[(i + 1) % copies]
        hs = [x]
        for w, b in zip(fw, bias):
            hs.append(torch.relu(torch.addmm(b, hs[-1], w.t())))
        g = torch.ones_like(hs[-1])
        grads = []
        for k in reversed(range(layers)):
            g = g * (hs[k + 1] > 0)
            grads.append(g.t() @ hs[k])  # the weight gradient
            g = g @ bw[k]  # the input gradient, with the backward's copy
        with torch.no_grad():
            for w, gw in zip(fw, reversed(grads)):
                w.add_(gw, alpha=-1e-6)
        i += 1
        if i == 10:  # warmed up
            t0 = time.perf_counter()
        elif i > 10:
            n += 1
            if time.perf_counter() - t0 >= seconds:
                break
    out.put((time.perf_counter() - t0) / n)


def pair(args: argparse.Namespace, width: int, rows: int, copies: int) -> float:
    """Both processes at once; the slower one's seconds per iteration."""
    q: mp.Queue = mp.Queue()
    procs = [
        mp.Process(target=loop, args=(width, rows, args.layers, copies, args.seconds, q))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    times = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return max(times)


def main() -> None:
    args = parse()
    mp.set_start_method("spawn")
    print("== weight footprint: time per F + B + U against the number of weight copies ==")
    print(_grid.environment(1))
    print(
        f"2 processes at once, 1 thread each; {args.layers} x Linear(width)+ReLU; "
        f"{args.seconds:g} s per run, {args.rounds} rounds; ratio: median time over the "
        "median with 1 copy (per-round ratios in brackets)"
    )
    print(
        f"{'width':>6}{'rows':>6}{'1 copy ms':>11}  "
        + "  ".join(f"{c} cop{'y' if c == 1 else 'ies'}" for c in args.copies)
    )
    for width, rows in args.shapes:
        res: dict[int, list[float]] = {c: [] for c in args.copies}
        for _ in range(args.rounds):
            for c in args.copies:
                res[c].append(pair(args, width, rows, c))
        base = statistics.median(res[args.copies[0]])
        cells = [
            f"{statistics.median(v) / base:.3f} ({' '.join(f'{t / base:.2f}' for t in v)})"
            for v in res.values()
        ]
        print(f"{width:>6}{rows:>6}{base * 1e3:>11.2f}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
