"""Every method on the byte-level Shakespeare language model, several seeds, in the emulator.

    python benchmarks/lm.py --out docs/results/lm --methods gpipe,pipedream,v-timeprest \
        --seeds 0,1,2 --windows 9600 --jobs 2

Each run is a normal ``timeprest train`` run directory (``OUT/<method>/seed<k>``,
reused when finished, so an interrupted benchmark continues). All runs share
the model (``gpt``: 4 blocks of width 128, context 128 bytes), the split
(embedding + block, block, block, block + head: parameter-balanced), the data
order of each seed, AdamW with warm-up and cosine decay and per-stage gradient
clipping. The script writes ``results.md`` (final validation bits per byte
mean ± sd, tokens to a target, staleness, relative distance, memory per
stage) and ``curves.png`` (validation bits per byte against training tokens,
from each run's ``--eval-every`` evaluations).
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


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, seed) in this worker process; its summary, or its divergence."""
    import torch

    from timeprest.errors import NonFiniteLossError
    from timeprest.train import TrainConfig, run_training

    torch.set_num_threads(1)
    run_dir = Path(job["run_dir"])
    if (run_dir / "summary.json").exists():
        return {"job": job, "summary": json.loads((run_dir / "summary.json").read_text())}
    cfg = TrainConfig(
        dataset="shakespeare",
        model="gpt",
        model_opt=job["model_opt"],
        method=job["method"],
        stages=job["stages"],
        microbatches=job["microbatches"],
        epochs=job["epochs"],
        batch_size=job["batch_size"],
        lr=job["lr"],
        optimizer="adamw",
        weight_decay=0.1,
        warmup_epochs=job["warmup"],
        lr_schedule="cosine",
        clip_grad_norm=1.0,
        balance="params",
        seed=job["seed"],
        train_limit=job["windows"],
        test_limit=job["val_windows"],
        eval_every=job["eval_every"],
        run_dir=str(run_dir),
        threads=1,
        progress=False,
    )
    try:
        result = run_training(cfg, overwrite=True, log=lambda _: None)
    except NonFiniteLossError as exc:
        return {"job": job, "summary": None, "diverged": str(exc)}
    return {"job": job, "summary": result.summary}


def evals(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "evals.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tokens_to(target: float, run_dir: Path, tokens_per_minibatch: int) -> int | None:
    for e in evals(run_dir):
        if e["bits_per_byte"] <= target:
            return int(e["minibatches"]) * tokens_per_minibatch
    return None


def table(results: dict[str, list[dict[str, Any]]], target: float, tpm: int) -> str:
    out = [
        f"| method | seeds | final val bits/byte | tokens to {target} bits/byte | mean staleness"
        " per stage | mean rel. distance per stage | peak weight-version KiB per stage"
        " | peak activation KiB per stage | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        ok = [r for r in runs if r["summary"] is not None]
        if not ok:
            out.append(f"| {method} | {len(runs)} | diverged | - | - | - | - | - | - |")
            continue
        s = [r["summary"] for r in ok]
        reach = [tokens_to(target, Path(r["job"]["run_dir"]), tpm) for r in ok]
        stale = [statistics.mean(c) for c in zip(*[x["mean_staleness"] for x in s])]
        # measured every --distance-every mini-batches: None where an epoch had none
        dist = [mean_known(c) for c in zip(*[x["mean_relative_distance"] for x in s])]
        kib = " / ".join(f"{b / 1024:.0f}" for b in s[0]["peak_weight_bytes"])
        act = " / ".join(f"{b / 1024:.0f}" for b in s[0]["peak_activation_bytes"])
        out.append(
            f"| {method} | {len(runs)} | {mean_sd([x['final_bits_per_byte'] for x in s])}"
            + (f" ({len(runs) - len(ok)} diverged)" if len(ok) < len(runs) else "")
            + " | "
            + ", ".join("-" if t is None else f"{t / 1e6:.2f}M" for t in reach)
            + " | "
            + " / ".join(f"{v:.2f}" for v in stale)
            + " | "
            + " / ".join("-" if v is None else f"{v:.4f}" for v in dist)
            + f" | {kib} | {act} | {statistics.mean(x['wall_time'] for x in s):.0f} |"
        )
    return "\n".join(out) + "\n"


def curves(results: dict[str, list[dict[str, Any]]], png: Path, tpm: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from timeprest.policy.methods import METHODS

    section6 = {"gpipe", "1f1b", "pipedream", "pipedream-2bw", "timeprest", "v-timeprest"}
    section6.add("i-timeprest")
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (method, runs) in enumerate(results.items()):
        color = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        style = "-" if method in section6 or method not in METHODS else "--"
        for k, r in enumerate(runs):
            e = evals(Path(r["job"]["run_dir"]))
            if e:
                ax.plot(
                    [x["minibatches"] * tpm / 1e6 for x in e],
                    [x["bits_per_byte"] for x in e],
                    color=color,
                    linestyle=style,
                    alpha=0.85,
                    label=method if k == 0 else None,
                )
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, title="dashed: the other remedies", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/results/lm")
    p.add_argument("--methods", default="gpipe,pipedream,v-timeprest,i-timeprest")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument(
        "--microbatches", type=int, default=None, help="N (default: each method's own: W, or 1)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--windows", type=int, default=9600, help="training windows per epoch")
    p.add_argument("--val-windows", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up, in epochs")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--model-opt", default="block_size=128,n_layer=4,n_head=4,n_embd=128")
    p.add_argument("--target", type=float, default=3.0, help="bits per byte")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: tabulate and draw the finished runs among the ones asked for",
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    block = int(dict(kv.split("=") for kv in args.model_opt.split(","))["block_size"])
    tpm = args.batch_size * block  # tokens per mini-batch
    jobs = [
        {
            "method": m,
            "seed": seed,
            "run_dir": str(out / m / f"seed{seed}"),
            "model_opt": args.model_opt,
            "stages": args.stages,
            "microbatches": args.microbatches,
            "epochs": args.epochs,
            "windows": args.windows,
            "val_windows": args.val_windows,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "eval_every": args.eval_every,
        }
        for m in methods
        for seed in seeds
    ]
    if args.table_only:
        jobs = [j for j in jobs if (Path(j["run_dir"]) / "summary.json").exists()]
        methods = [m for m in methods if any(j["method"] == m for j in jobs)]
    print(
        f"{len(jobs)} runs: {', '.join(methods)} x seeds {seeds}; W={args.stages}, "
        f"N={args.microbatches or 'each method default'}, {args.windows} windows x {args.epochs} epoch(s), "
        f"batch {args.batch_size}, lr {args.lr}; python {sys.version.split()[0]}, "
        f"{platform.machine()}, {os.cpu_count()} cores",
        flush=True,
    )
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(run_one, jobs):
            results[r["job"]["method"]].append(r)
            s = r["summary"]
            what = "diverged" if s is None else f"{s['final_bits_per_byte']:.3f} bits/byte"
            print(f"  {r['job']['method']} seed {r['job']['seed']}: {what}", flush=True)
    text = table(results, args.target, tpm)
    (out / "results.md").write_text(
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`\n\n"
        + text
        + f"\nTotal {time.perf_counter() - t0:.0f} s.\n"
    )
    curves(results, out / "curves.png", tpm)
    print(text)


if __name__ == "__main__":
    main()
