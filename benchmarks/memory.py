"""Weight-version, saved-activation and optimizer memory per stage: measured vs predicted.

For every method, trains the cnn on a few Fashion-MNIST mini-batches in the
emulator (W stages, N micro-batches) and prints, per stage, the measured peak
bytes of held weight versions, of saved activations and of optimizer state,
next to what the simulator predicts from a profile of the same stages:

    python benchmarks/memory.py --stages 4 --microbatches 4 --minibatches 12

With ``--out FILE.md`` it also writes the table as markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import warnings

import torch
from torch import nn

from timeprest import METHODS, Pipeline
from timeprest.data import load_dataset, make_batches
from timeprest.models import build_model
from timeprest.policy import get_method
from timeprest.sim import simulate
from timeprest.sim.costmodel import CostModel
from timeprest.sim.profile import profile_stages
from timeprest.splitting import split


def kib(n: float) -> str:
    return f"{n / 1024:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("configuration:", json.dumps(vars(args)))
    print(
        "environment:",
        json.dumps(
            {
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "platform": platform.platform(),
            }
        ),
    )
    data = load_dataset(args.dataset)
    batches = list(make_batches(data.train, args.batch_size, seed=0))[: args.minibatches]
    torch.manual_seed(0)
    model = build_model(
        args.model,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
    )
    base = split(model, args.stages, "params")

    def opt(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if args.optimizer == "adam":
            return torch.optim.Adam(params, lr=1e-3)
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)

    rows = []
    profiles: dict[int, CostModel] = {}  # one profile per micro-batch count N
    for method in METHODS:
        n = get_method(method).default_microbatches or args.microbatches
        if method != "pipedream":
            n = args.microbatches
        stages = copy.deepcopy(base)
        x0, y0 = batches[0]
        if n not in profiles:  # sizes are what this compares: the layers' times suffice
            profiles[n] = profile_stages(
                base,
                x0,
                n,
                sample_target=y0,
                loss_fn=nn.functional.cross_entropy,
                optimizer=opt,
                repeats=1,
                warmup=1,
                method=None,
            )
        cm = profiles[n]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = Pipeline(
                stages,
                method=method,
                num_microbatches=n,
                optimizer=opt,
                loss_fn=nn.functional.cross_entropy,
            )
            pipe.train(batches)
            sim = simulate(method, args.stages, n, args.minibatches, cm, order_costs="default")
        for s in range(args.stages):
            m = pipe.report.stages[s]
            pr = sim.stages[s]
            rows.append(
                {
                    "method": method,
                    "N": n,
                    "stage": s,
                    "versions": m.peak_versions,
                    "versions_pred": pr.weight_versions,
                    "weight": m.peak_weight_bytes,
                    "weight_pred": pr.peak_weight_bytes,
                    "act": m.peak_activation_bytes,
                    "act_pred": pr.peak_activation_bytes,
                    "opt": m.optimizer_state_bytes,
                    "opt_pred": pr.optimizer_state_bytes,
                }
            )
    head = (
        "| method | N | stage | versions (meas/pred) | weight KiB meas | pred | "
        "saved activations KiB meas | pred | ratio | optimizer KiB meas | pred |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {r['N']} | {r['stage']} | {r['versions']}/{r['versions_pred']} | "
        f"{kib(r['weight'])} | {kib(r['weight_pred'])} | {kib(r['act'])} | {kib(r['act_pred'])} | "
        f"{r['act_pred'] / max(r['act'], 1):.3f} | {kib(r['opt'])} | {kib(r['opt_pred'])} |"
        for r in rows
    ]
    table = head + "\n".join(lines) + "\n"
    exact_w = all(r["weight"] == r["weight_pred"] for r in rows)
    worst = max(abs(r["act_pred"] / max(r["act"], 1) - 1) for r in rows)
    summary = (
        f"\nweight-version bytes predicted exactly: {exact_w}; "
        f"largest saved-activation prediction error: {worst * 100:.1f}%\n"
    )
    print(table + summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Memory per stage: {args.model} on {args.dataset}, W={args.stages}\n\n")
            f.write(f"Command: `python benchmarks/memory.py {' '.join(argv or sys.argv[1:])}`\n\n")
            f.write(table + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
