"""Convergence of every method on real data, several seeds, in the emulator.

Runs each variant (a method, plus I-TiMePReSt at several values of lambda)
for each seed with the same data order, split, learning-rate schedule and
initial weights, then writes a markdown table and curves:

    python benchmarks/convergence.py --out docs/results/convergence \
        --epochs 3 --seeds 0,1,2 --jobs 2

Each run is a normal run directory (``OUT/<variant>/seed<k>``); finished
runs are reused, so an interrupted benchmark continues where it stopped.
``--sweep LR1,LR2,...`` instead trains a few methods at several learning
rates (one seed) to show where staleness starts to matter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from timeprest.report import mean_known

VARIANTS = [
    "gpipe",
    "1f1b",
    "pipedream",
    "pipedream-2bw",
    "timeprest",
    "v-timeprest",
    "i-timeprest@1",
    "i-timeprest@0.5",
    "i-timeprest@2",
]


def parse_variant(v: str) -> tuple[str, float | None]:
    method, _, lam = v.partition("@")
    return method, (float(lam) if lam else None)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (variant, seed) in this worker process; return its summary."""
    import torch

    from timeprest.errors import NonFiniteLossError
    from timeprest.train import TrainConfig, run_training

    torch.set_num_threads(1)
    run_dir = Path(job["run_dir"])
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        return {"job": job, "summary": json.loads(summary_file.read_text()), "reused": True}
    method, lam = parse_variant(job["variant"])
    microbatches = job["microbatches"]
    if method == "pipedream" and job["pipedream_n1"]:
        microbatches = 1
    cfg = TrainConfig(
        dataset=job["dataset"],
        model=job["model"],
        method=method,
        decay=lam,
        stages=job["stages"],
        microbatches=microbatches,
        epochs=job["epochs"],
        batch_size=job["batch_size"],
        lr=job["lr"],
        optimizer=job["optimizer"],
        momentum=job["momentum"],
        lr_schedule=job["lr_schedule"],
        balance=job["balance"],
        seed=job["seed"],
        train_limit=job["train_limit"],
        run_dir=str(run_dir),
        target_accuracy=job["target"],
        threads=1,
        progress=False,
    )
    lines: list[str] = []
    try:
        result = run_training(cfg, overwrite=True, log=lines.append)
    except NonFiniteLossError as exc:
        # divergence is a result of the comparison, not a failure of the benchmark
        return {"job": job, "summary": None, "diverged": str(exc), "reused": False}
    return {"job": job, "summary": result.summary, "reused": False, "log": lines}


def fmt_mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ± {statistics.stdev(values) * scale:.2f}"


def load_history(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "epochs.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


def table(results: dict[str, list[dict[str, Any]]], target: float | None) -> str:
    head = (
        "| variant | final test acc % | best test acc % | epochs to "
        + (f"{target * 100:.0f}%" if target else "target")
        + " | mean staleness per stage | mean rel. distance per stage"
        " | peak weight-version KiB per stage | s / epoch |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for variant, runs in results.items():
        diverged = [r for r in runs if r["summary"] is None]
        s = [r["summary"] for r in runs if r["summary"] is not None]
        if not s:
            rows.append(f"| {variant} | diverged | diverged | - | - | - | - | - |")
            continue
        final = [x["final_test_accuracy"] for x in s]
        best = [x["best_test_accuracy"] for x in s]
        reach = [x["epochs_to_target"] for x in s]
        reach_txt = ", ".join("-" if r is None else str(r) for r in reach)
        stale = [statistics.mean(col) for col in zip(*[x["mean_staleness"] for x in s])]
        # measured every --distance-every mini-batches: None where an epoch had none
        dist = [mean_known(c) for c in zip(*[x["mean_relative_distance"] for x in s])]
        peak = s[0]["peak_weight_bytes"]
        ept = statistics.mean(x["mean_epoch_time"] for x in s)
        rows.append(
            f"| {variant} | {fmt_mean_std(final)} | {fmt_mean_std(best)} | {reach_txt} | "
            + " / ".join(f"{v:.2f}" for v in stale)
            + " | "
            + " / ".join("-" if v is None else f"{v:.4f}" for v in dist)
            + " | "
            + " / ".join(f"{b / 1024:.0f}" for b in peak)
            + f" | {ept:.0f} |"
            + (f" ({len(diverged)} of {len(runs)} runs diverged)" if diverged else "")
        )
    return head + "\n".join(rows) + "\n"


def plot_curves(results: dict[str, list[dict[str, Any]]], out: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no curves (pip install timeprest[plot])")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, runs in results.items():
        hists = [load_history(Path(r["job"]["run_dir"])) for r in runs if r["summary"]]
        hists = [h for h in hists if h]
        if not hists:
            continue
        n = min(len(h) for h in hists)
        epochs = list(range(1, n + 1))
        acc = [statistics.mean(h[i]["test_accuracy"] for h in hists) * 100 for i in range(n)]
        loss = [statistics.mean(h[i]["train_loss"] for h in hists) for i in range(n)]
        axes[0].plot(epochs, acc, marker="o", label=variant)
        axes[1].plot(epochs, loss, marker="o", label=variant)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: test accuracy")
    axes[1].set(xlabel="epoch", ylabel="train loss", title=f"{title}: train loss", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="docs/results/convergence")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--pipedream-n1", type=int, default=1, help="1: pipedream runs with N=1")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr-schedule", default="cosine")
    p.add_argument("--balance", default="params")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument(
        "--sweep", default=None, help="comma-separated learning rates: a one-seed LR sweep"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.sweep.split(",")] if args.sweep else [args.lr]
    if args.sweep:
        seeds = seeds[:1]
    jobs = []
    for lr in lrs:
        for variant in variants:
            for seed in seeds:
                sub = f"lr{lr:g}/{variant}/seed{seed}" if args.sweep else f"{variant}/seed{seed}"
                jobs.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "lr": lr,
                        "run_dir": str(out / sub),
                        "dataset": args.dataset,
                        "model": args.model,
                        "stages": args.stages,
                        "microbatches": args.microbatches,
                        "pipedream_n1": bool(args.pipedream_n1),
                        "epochs": args.epochs,
                        "batch_size": args.batch_size,
                        "momentum": args.momentum,
                        "optimizer": args.optimizer,
                        "lr_schedule": args.lr_schedule,
                        "balance": args.balance,
                        "train_limit": args.train_limit,
                        "target": args.target,
                    }
                )
    config = {k: v for k, v in vars(args).items()}
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    print("configuration:", json.dumps(config))
    print("environment:", json.dumps(env))
    t0 = time.perf_counter()
    results: dict[tuple[float, str], list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for res in pool.map(run_one, jobs):
            job = res["job"]
            s = res["summary"]
            tag = "reused" if res["reused"] else "trained"
            if s is None:
                print(
                    f"diverged: lr={job['lr']:g} {job['variant']} seed {job['seed']}: "
                    f"{res['diverged']}",
                    flush=True,
                )
                results.setdefault((job["lr"], job["variant"]), []).append(res)
                continue
            print(
                f"{tag}: lr={job['lr']:g} {job['variant']} seed {job['seed']}: "
                f"final {s['final_test_accuracy'] * 100:.2f}% best {s['best_test_accuracy'] * 100:.2f}% "
                f"({s['wall_time']:.0f}s)",
                flush=True,
            )
            results.setdefault((job["lr"], job["variant"]), []).append(res)
    md = [f"# Convergence: {args.model} on {args.dataset}, W={args.stages}\n"]
    md.append(f"Command: `python benchmarks/convergence.py {' '.join(argv or sys.argv[1:])}`\n")
    md.append(f"Configuration: `{json.dumps(config)}`\n")
    md.append(f"Environment: `{json.dumps(env)}`\n")
    for lr in lrs:
        by_variant = {v: results[(lr, v)] for v in variants}
        md.append(f"\n## lr = {lr:g}\n\n")
        md.append(table(by_variant, args.target))
        lr_out = out / f"lr{lr:g}" if args.sweep else out
        lr_out.mkdir(parents=True, exist_ok=True)
        png = plot_curves(by_variant, lr_out, f"{args.model}/{args.dataset} lr={lr:g}")
        if png:
            md.append(f"\n![curves]({png.relative_to(out)})\n")
    md.append(f"\nTotal time: {time.perf_counter() - t0:.0f} s\n")
    (out / "results.md").write_text("".join(md))
    print("".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
