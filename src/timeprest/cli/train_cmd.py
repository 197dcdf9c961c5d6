"""``timeprest train``: train a model on a dataset with a pipeline method."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from timeprest.policy import method_names
from timeprest.train import (
    DEVICES,
    ENGINES,
    LR_SCHEDULES,
    OPTIMIZERS,
    TrainConfig,
    load_config_file,
    run_training,
)


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_training_flags(p: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """Flags shared by ``train`` and ``compare``; every default is taken from TrainConfig."""
    d = TrainConfig()
    S = argparse.SUPPRESS  # unset flags stay unset, so a config file can supply them
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--dataset",
        default=S,
        help=f"dataset (default {d.dataset}); also mnist, cifar10, cifar100, imagefolder:PATH, synthetic",
    )
    g.add_argument("--data-dir", default=S, help="directory holding the dataset files")
    g.add_argument("--image-size", type=int, default=S, help="resize images to this square size")
    g.add_argument("--train-limit", type=int, default=S, help="use only the first N training rows")
    g.add_argument("--test-limit", type=int, default=S, help="use only the first N test rows")
    g.add_argument(
        "--model", default=S, help=f"mlp, cnn, resnet18, vgg16, resnet50 (default {d.model})"
    )
    g.add_argument(
        "--augment",
        type=_bool,
        default=S,
        help="random crop + flip (default: on for CIFAR-like data)",
    )
    g = p.add_argument_group("pipeline")
    if with_method:
        g.add_argument(
            "--method", default=S, help=f"{', '.join(method_names())} (default {d.method})"
        )
    g.add_argument("--stages", type=int, default=S, help=f"number of stages W (default {d.stages})")
    g.add_argument(
        "--microbatches",
        type=int,
        default=S,
        help="micro-batches per mini-batch N (default: the method's, else W)",
    )
    g.add_argument("--schedule", default=S, help="override the schedule: gpipe, 1f1b, nf1b, 2bw")
    g.add_argument(
        "--forward", default=S, help="override the forward rule: live, vertical, previous"
    )
    g.add_argument(
        "--backward", default=S, help="override the backward rule: stashed, latest, intermediate"
    )
    g.add_argument("--grad-rule", default=S, help="graph or recompute")
    g.add_argument("--significance", default=S, help="exp or inverse (I-TiMePReSt's sigma)")
    g.add_argument("--decay", type=float, default=S, help="lambda of sigma (default 1.0)")
    g.add_argument("--costs", default=S, help="order of asynchronous schedules: default or paper")
    g.add_argument(
        "--balance",
        default=S,
        help="stage split: time, params or counts like 3,3,3,3 (default time)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help=f"default {d.epochs}")
    g.add_argument(
        "--batch-size", type=int, default=S, help=f"mini-batch rows (default {d.batch_size})"
    )
    g.add_argument("--lr", type=float, default=S, help=f"learning rate (default {d.lr})")
    g.add_argument(
        "--optimizer", default=S, help=f"{', '.join(OPTIMIZERS)} (default {d.optimizer})"
    )
    g.add_argument("--momentum", type=float, default=S, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, default=S, help="default 0")
    g.add_argument(
        "--warmup-epochs", type=float, default=S, help="linear warm-up length in epochs (default 0)"
    )
    g.add_argument(
        "--lr-schedule", default=S, help=f"{', '.join(LR_SCHEDULES)} (default {d.lr_schedule})"
    )
    g.add_argument("--seed", type=int, default=S, help="default 0")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=S, help=f"{', '.join(DEVICES)} (default cpu)")
    g.add_argument("--engine", default=S, help=f"{', '.join(ENGINES)} (default emulate)")
    g.add_argument(
        "--nproc", type=int, default=S, help="processes for --engine distributed (= stages)"
    )
    g.add_argument("--threads", type=int, default=S, help="intra-op threads per process")
    g.add_argument(
        "--target-accuracy",
        type=float,
        default=S,
        help="report the epochs needed to reach this test accuracy (0..1)",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=S, help="no progress bar"
    )
    p.add_argument("--config", default=None, help="TOML file of settings; flags override it")


def config_from_args(args: argparse.Namespace, **forced: Any) -> TrainConfig:
    """TrainConfig defaults, then the --config file, then the flags given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in vars(args).items():
        if k in names:
            values[k] = v
    values.update(forced)
    return TrainConfig(**values)


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
        default=None,
        help="where to write the run (default runs/<method>-<model>-<dataset>-W<stages>-s<seed>)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last checkpoint",
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --run-dir holds")
    p.add_argument("--verbose", action="store_true", help="print full error texts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    forced = {"run_dir": args.run_dir} if args.run_dir else {}
    cfg = config_from_args(args, **forced)
    run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0
