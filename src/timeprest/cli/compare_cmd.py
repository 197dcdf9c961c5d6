"""``timeprest compare``: train several methods on the same settings and tabulate them.

Examples::

    timeprest compare --dataset fashion-mnist --model cnn --stages 4 --epochs 10 \\
        --target-accuracy 0.85
    timeprest compare --methods pipedream,v-timeprest,i-timeprest@0.5,i-timeprest@2 \\
        --dataset synthetic --model mlp --stages 2 --epochs 3 --out runs/lambda

Each method runs in ``OUT/<method>`` (a full run directory, see ``timeprest
train``); ``OUT/results.md`` holds the table and the figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timeprest.cli.common import add_training_flags, config_from_args
from timeprest.compare import DEFAULT_METHODS, compare


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train several methods with the same data, split, seed and settings; write a table",
        description=(
            "Train the methods one after another with identical settings (each in OUT/<method>), "
            "then write OUT/results.md: final and best test accuracy, epochs to "
            "--target-accuracy, weight versions and peak weight bytes per stage, mean staleness, "
            "time per epoch, and the figures of timeprest plot. A finished run of the same "
            "configuration already in OUT/<method> is reused."
        ),
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=(
            "comma-separated methods; METHOD@LAMBDA sets the decay of an intermediate backward, "
            "e.g. i-timeprest@0.5. Without --microbatches each method takes its own default "
            "(pipedream N=1, the others N=W); an explicit --microbatches applies to all "
            f"(default {','.join(DEFAULT_METHODS)})"
        ),
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default runs/compare-<model>-<dataset>-W<stages>-s<seed>)",
    )
    add_training_flags(p, with_method=False)
    either = p.add_mutually_exclusive_group()
    either.add_argument(
        "--resume",
        action="store_true",
        help="continue unfinished runs in OUT (methods not started yet start fresh)",
    )
    either.add_argument(
        "--overwrite", action="store_true", help="retrain every method, replacing what OUT holds"
    )
    p.add_argument("--no-plots", dest="plots", action="store_false", help="table only")
    p.add_argument("--verbose", action="store_true", help="print full error texts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    base = config_from_args(args)
    if args.out is not None:
        out = Path(args.out)
    else:
        data = base.dataset.replace(":", "_").replace("/", "_")
        out = Path("runs") / f"compare-{base.model}-{data}-W{base.stages}-s{base.seed}"
    compare(
        base,
        args.methods,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        plots=args.plots,
    )
    return 0
