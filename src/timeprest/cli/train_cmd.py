"""``timeprest train``: train a model on a dataset with a pipeline method."""

from __future__ import annotations

import argparse

from timeprest.cli.common import add_training_flags, config_from_args
from timeprest.train import run_training


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a pipeline method (default: cnn on Fashion-MNIST, i-timeprest, 4 stages)",
        description="Train a model on real data with a pipeline-parallel method. "
        "Writes config, metrics (JSON lines), a summary and checkpoints to the run directory.",
    )
    add_training_flags(p)
    p.add_argument(
        "--run-dir",
        default=argparse.SUPPRESS,  # unset: the config file's, else the default name
        help="where to write the run (default runs/<method>-<model>-<dataset>-W<stages>-s<seed>)",
    )
    either = p.add_mutually_exclusive_group()
    either.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last checkpoint",
    )
    either.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run --run-dir holds (removed once the new run has passed its checks)",
    )
    p.add_argument("--verbose", action="store_true", help="print full error texts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0
