"""Every method, old and new remedies alike, on the same data, split and seeds.

For each W and method, trains every seed in the emulator (same data order,
initial weights and learning-rate schedule) and prints, per method: final test
accuracy mean ± sd over the seeds that finished, how many diverged (a
divergence is a result, not a failure), and the memory each stage holds for
weights (peak versions, transients, the remedy buffers of docs/design.md
section 12) and optimizer state:

    python benchmarks/remedies.py --stages 4,8 --optimizer sgd --momentum 0.9 \\
        --lr 0.05 --seeds 0,1,2 --epochs 3 --out docs/results/remedies

Runs are normal run directories (``OUT/W<w>/<method>/seed<k>``), reused when
finished, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convergence import fmt_mean_std, load_history, run_one  # noqa: E402


def all_methods() -> list[str]:
    from timeprest.policy import method_names

    return method_names()


def stage_memory(method: str, res: dict[str, Any]) -> list[int] | None:
    """Bytes per stage: peak weights (with transients) + remedy buffers + optimizer state."""
    from timeprest.policy import resolve_policy

    hist = load_history(Path(res["job"]["run_dir"]))
    if not hist:
        return None
    last = hist[-1]
    buffers = resolve_policy(method)[1].extra_buffers
    return [
        w + buffers * b + o
        for w, b, o in zip(
            last["peak_weight_bytes"], last["weight_bytes"], last["optimizer_state_bytes"]
        )
    ]


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    from timeprest.policy import resolve_policy

    lines = [
        "| method | final test acc % | diverged | versions per stage | buffers "
        "| memory KiB per stage (weights + buffers + optimizer) |",
        "|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        done = [r for r in runs if r["summary"] is not None]
        acc = [r["summary"]["final_test_accuracy"] for r in done]
        versions = done[0]["summary"]["peak_versions"] if done else []
        mem = stage_memory(method, done[0]) if done else None
        buffers = resolve_policy(method)[1].extra_buffers
        lines.append(
            f"| {method} | {fmt_mean_std(acc)} | {len(runs) - len(done)} of {len(runs)} | "
            + (" / ".join(str(v) for v in versions) or "-")
            + f" | {buffers} | "
            + (" / ".join(f"{b / 1024:.0f}" for b in mem) if mem else "-")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="docs/results/remedies")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    p.add_argument("--stages", default="4,8", help="comma-separated values of W")
    p.add_argument("--microbatches", type=int, default=None, help="N (default: each method's own)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr-schedule", default="constant")
    p.add_argument("--balance", default="params")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    args = p.parse_args(argv)
    out = Path(args.out)
    methods = args.methods.split(",") if args.methods else all_methods()
    stages = [int(w) for w in args.stages.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [
        {
            "variant": method,
            "seed": seed,
            "lr": args.lr,
            "run_dir": str(out / f"W{w}" / method / f"seed{seed}"),
            "dataset": args.dataset,
            "model": args.model,
            "stages": w,
            "microbatches": args.microbatches,
            "pipedream_n1": False,  # N is each method's own unless --microbatches
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "momentum": args.momentum,
            "optimizer": args.optimizer,
            "lr_schedule": args.lr_schedule,
            "balance": args.balance,
            "train_limit": args.train_limit,
            "target": None,
        }
        for w in stages
        for method in methods
        for seed in seeds
    ]
    print("configuration:", json.dumps(vars(args)), flush=True)
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            done = list(pool.map(run_one, jobs))
    else:
        done = [run_one(job) for job in jobs]
    md = [f"# Staleness remedies: {args.model} on {args.dataset}\n\n"]
    md.append(f"Command: `python benchmarks/remedies.py {' '.join(argv or sys.argv[1:])}`\n")
    for w in stages:
        by_method: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for res in done:
            if res["job"]["stages"] == w:
                by_method[res["job"]["variant"]].append(res)
        md.append(f"\n## W = {w}, {args.optimizer} lr {args.lr:g}\n\n")
        md.append(table(by_method))
    md.append(f"\nTotal time: {time.perf_counter() - t0:.0f} s\n")
    text = "".join(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
