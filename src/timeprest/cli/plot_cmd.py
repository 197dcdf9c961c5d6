"""``timeprest plot``: PNG figures of one or more training runs.

Examples::

    timeprest plot runs/i-timeprest-cnn-fashion-mnist-W4-s0
    timeprest plot runs/a runs/b --out figures/
    timeprest plot runs/compare-cnn-fashion-mnist-W4-s0    # every run a compare wrote
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timeprest.plots import PLOT_FILES, plot_runs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw accuracy, loss, memory and staleness figures of training runs (PNG)",
        description=(
            "Draw test accuracy and train loss against epochs and wall time, weight versions "
            "and peak weight bytes per stage, and mean staleness and relative weight distance "
            f"per stage, one line or bar per run: {', '.join(PLOT_FILES)}. "
            "Needs matplotlib (pip install timeprest[plot])."
        ),
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories of timeprest train, or an output directory of timeprest compare",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where to write the PNG files (default RUN_DIR/plots for one run, ./plots for several)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        out = Path(args.out)
    elif len(args.run_dirs) == 1:
        out = Path(args.run_dirs[0]) / "plots"
    else:
        out = Path("plots")
    for path in plot_runs(args.run_dirs, out):
        print(path)
    return 0
