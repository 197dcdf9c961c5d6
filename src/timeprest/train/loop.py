"""The training loop: ``run_training(TrainConfig(...))``, what ``timeprest train`` calls.

It loads the data, builds and splits the model, trains with a :class:`Pipeline`
epoch by epoch (the pipeline drains at the end of each epoch), evaluates on
the test set and writes the run directory (:mod:`timeprest.train.rundir`).
The same loop serves both engines: what differs is asked of a
:mod:`~timeprest.train.context`. With ``--engine distributed`` outside a
torchrun job, :func:`run_training` starts ``timeprest train`` itself under
torchrun on loopback, and each worker runs this loop for its stage.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from timeprest.files import read_json, write_json
from timeprest.train.config import TrainConfig, write_config_file
from timeprest.train.context import RunContext, make_context
from timeprest.train.progress import EpochProgress
from timeprest.train.records import (
    EpochRow,
    append_epoch,
    append_minibatches,
    read_epochs,
    summarize,
    trim_logs,
)
from timeprest.train.rundir import (
    Progress,
    prepare_run_dir,
    run_dir_of,
    saved_split,
    write_run_files,
)

if TYPE_CHECKING:
    from timeprest.data import Dataset
    from timeprest.pipeline import Pipeline
    from timeprest.splitting import SplitPlan


@dataclass
class RunResult:
    """What a run produced: its directory, summary.json and its epoch rows."""

    run_dir: Path
    summary: dict[str, Any]
    epochs: list[EpochRow] = field(default_factory=list)


def make_optimizer(cfg: TrainConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "nadam":  # with pipedream: the Nesterov method (docs/design.md 12)
            return torch.optim.NAdam(
                params,
                lr=cfg.lr,
                betas=(cfg.momentum, 0.999),
                weight_decay=cfg.weight_decay,
                decoupled_weight_decay=True,
            )
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    return build


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate factor of the update of mini-batch ``t`` (warm-up, then constant or cosine)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t - warm, span) / span))

    return factor


def build_pipeline(cfg: TrainConfig, steps_per_epoch: int, **options: Any) -> Pipeline:
    """The Pipeline a run of ``cfg`` trains (``options``: its stages and engine options)."""
    from timeprest.pipeline import Pipeline

    return Pipeline(
        method=cfg.method,
        num_microbatches=cfg.num_microbatches,
        optimizer=make_optimizer(cfg),
        loss_fn=nn.functional.cross_entropy,
        **cfg.overrides(),
        costs=cfg.costs,
        seed=cfg.seed,
        lr_lambda=lr_factor(cfg, steps_per_epoch),
        **options,
    )


def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train as ``cfg`` says; write the run directory; return the summary."""
    from timeprest.engine.launch import in_distributed_job

    cfg.validate()
    if cfg.engine == "distributed" and not in_distributed_job():
        return launch_training(cfg, resume=resume, overwrite=overwrite, log=log)
    if cfg.threads is not None and cfg.engine != "distributed":  # the runtime sets its own
        torch.set_num_threads(cfg.threads)
    ctx = make_context(cfg.engine, cfg.device, cfg.threads, cfg.stages)
    return _train(cfg, ctx, resume=resume, overwrite=overwrite, log=log if ctx.writes else _quiet)


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class _DataInfo:
    """What every process needs to know of the data, whether or not it reads them."""

    in_channels: int
    num_classes: int
    image_size: int
    augment: bool
    train_rows: int
    test_rows: int
    train_classes: int
    test_classes: int


def _load_data(cfg: TrainConfig) -> tuple[Dataset, Dataset, _DataInfo]:
    """The train and test sets of the run, with --train-limit/--test-limit drawn from the seed."""
    from timeprest.data import load_dataset, subset

    data = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
    train, test = data.train, data.test
    if cfg.train_limit:
        train = subset(train, cfg.train_limit, seed=cfg.seed, part="train")
    if cfg.test_limit:
        test = subset(test, cfg.test_limit, seed=cfg.seed, part="test")
    info = _DataInfo(
        data.in_channels,
        data.num_classes,
        data.image_size,
        data.augment_default if cfg.augment is None else cfg.augment,
        len(train),
        len(test),
        int(train.y.unique().numel()),
        int(test.y.unique().numel()),
    )
    return train, test, info


class ModelShape(Protocol):
    """What a model is built for: a DatasetPair, or what the data processes broadcast."""

    @property
    def in_channels(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def image_size(self) -> int: ...


def seeded_model(cfg: TrainConfig, shape: ModelShape, device: str) -> nn.Module:
    """``cfg.model`` for data of ``shape``, its initial weights drawn from ``cfg.seed``."""
    from timeprest.models import build_model

    torch.manual_seed(cfg.seed)
    return build_model(
        cfg.model,
        in_channels=shape.in_channels,
        num_classes=shape.num_classes,
        image_size=shape.image_size,
    ).to(device)


def split_plan(
    cfg: TrainConfig, model: nn.Module, train: Dataset, balance: Any, n: int, device: str
) -> SplitPlan:
    """The split of ``model``; ``balance="time"`` times one micro-batch of ``n`` per mini-batch."""
    from timeprest.splitting import plan_split

    sample = train.x[: max(cfg.batch_size // n, 1)].to(device)
    return plan_split(model, cfg.stages, balance, sample_input=sample, device=device)


def _train(
    cfg: TrainConfig,
    ctx: RunContext,
    *,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], None],
) -> RunResult:
    from timeprest.data import make_batches, num_batches
    from timeprest.splitting import apply_plan
    from timeprest.train.tensorboard import EpochWriter

    run_dir = Path(
        ctx.on_writer(
            "preparing the run directory",
            lambda: str(prepare_run_dir(cfg, resume=resume, overwrite=overwrite)),
        )
    )
    # the first and the last stage read the data; the others learn their shape
    loaded = ctx.on_readers("loading the dataset", lambda: _load_data(cfg))
    train_set, test_set = (loaded[0], loaded[1]) if loaded else (None, None)
    info = ctx.broadcast(loaded[2] if loaded else None)
    n = cfg.num_microbatches

    # every process builds the same model from the seed; the writer chooses the split
    # (timings differ between processes) and every process keeps what it runs
    model = seeded_model(cfg, info, ctx.model_device)

    def choose_split() -> Any:
        assert train_set is not None, "the writer reads the data"
        balance = saved_split(run_dir, resume) or cfg.balance_value()
        return split_plan(cfg, model, train_set, balance, n, ctx.model_device)

    plan = ctx.on_writer("splitting the model", choose_split)
    stages = apply_plan(model, plan)
    steps_per_epoch = num_batches(info.train_rows, cfg.batch_size)
    pipe = build_pipeline(cfg, steps_per_epoch, **ctx.pipeline_options(stages))
    if ctx.writes:
        write_run_files(run_dir, cfg, pipe.describe(), info.augment, plan.to_dict(), **ctx.env())
    where = f"in {ctx.world_size} processes" if ctx.world_size > 1 else "stages"
    log(
        f"{cfg.method}: {cfg.model} on {cfg.dataset} ({info.train_rows} train rows in "
        f"{info.train_classes} classes / {info.test_rows} test rows in {info.test_classes} "
        f"classes, of {info.num_classes}), W={cfg.stages} {where}, N={n} micro-batches, "
        f"batch {cfg.batch_size}, engine {cfg.engine}"
    )
    unit = "s" if plan.cost_unit == "s" else " params"
    log(
        "split: layers per stage "
        + ",".join(map(str, plan.layer_counts))
        + "; cost per stage "
        + ", ".join(
            f"{c * 1e3:.2f}ms" if unit == "s" else f"{int(c)}{unit}" for c in plan.stage_costs
        )
    )

    epochs_log, mb_log = run_dir / "epochs.jsonl", run_dir / "minibatches.jsonl"
    ckpt_dir = run_dir / "checkpoint"
    done = Progress(0, [], 0.0)
    if resume:
        done = ctx.on_writer("reading the checkpoint", lambda: Progress.read(ckpt_dir))
        pipe.load_checkpoint(ckpt_dir)
        if ctx.writes:
            trim_logs(epochs_log, mb_log, done.history, pipe.minibatches_done)
        log(f"resumed {run_dir} after epoch {done.epoch}")
    elif ctx.writes:
        for old in (epochs_log, mb_log):
            old.unlink(missing_ok=True)
    tb = EpochWriter(run_dir, start_epoch=done.epoch, enabled=ctx.writes)  # no-op without TB
    history = list(done.history)
    factor = lr_factor(cfg, steps_per_epoch)

    t_start = time.perf_counter() - done.wall_time
    for epoch in range(done.epoch, cfg.epochs):
        batches = None
        if train_set is not None:
            batches = make_batches(
                train_set,
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed,
                epoch=epoch,
                augment=info.augment,
            )
        progress = EpochProgress(
            epoch, cfg.epochs, steps_per_epoch, cfg.batch_size, cfg.progress and ctx.shows_progress
        )
        t0 = time.perf_counter()
        losses = pipe.train(
            batches,  # type: ignore[arg-type]  # None where this stage reads no data
            on_loss=progress.update if ctx.shows_progress else None,
        )
        train_time = time.perf_counter() - t0
        progress.close()
        test = ctx.evaluate(pipe, stages, test_set, cfg.eval_batch_size)
        rep = pipe.report
        row = EpochRow.from_report(
            epoch + 1,
            losses,
            test,
            train_time,
            time.perf_counter() - t_start,
            info.train_rows,
            factor(pipe.minibatches_done - 1),
            rep,
        )
        row = ctx.broadcast(row)  # the writer's clock for every process's history
        history.append(row)
        if ctx.writes:
            append_minibatches(mb_log, rep, epoch + 1)
            append_epoch(epochs_log, row)
            tb.write(row)
        # the per-mini-batch records are on disk now; keep memory flat on long runs
        # (the epoch means above were taken first)
        rep.minibatches.clear()
        pipe.save_checkpoint(ckpt_dir)
        if ctx.writes:
            Progress(epoch + 1, history, row.wall_time).write(ckpt_dir)
        ctx.barrier("writing the checkpoint")
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row.train_loss:.4f}, "
            f"test loss {row.test_loss:.4f}, test accuracy {row.test_accuracy * 100:.2f}%, "
            f"{train_time:.1f}s ({row.samples_per_s:,.0f} samples/s)"
        )
    tb.close()
    summary = summarize(cfg, history)
    if ctx.writes:
        write_json(run_dir / "summary.json", summary)
    log(
        f"done: final test accuracy {summary['final_test_accuracy'] * 100:.2f}%, "
        f"best {summary['best_test_accuracy'] * 100:.2f}%, {summary['wall_time']:.1f}s; "
        f"run dir {run_dir}"
    )
    ctx.barrier("finishing the run")
    return RunResult(run_dir, summary, history)


def launch_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """``--engine distributed`` outside torchrun: run ``timeprest train`` under torchrun.

    Starts ``cfg.nproc or cfg.stages`` workers on loopback with
    :func:`timeprest.engine.launch.launch_local`, each running this module's loop
    for its stage from the same configuration (a temporary config file), waits,
    and returns the result read back from the run directory.
    """
    from timeprest.engine.launch import StageFailure, launch_local

    nproc = cfg.nproc or cfg.stages
    fixed = replace(cfg, run_dir=str(run_dir_of(cfg)))  # every worker writes the same place
    with tempfile.TemporaryDirectory(prefix="timeprest-launch-") as tmp:
        config_file = str(Path(tmp) / "config.json")
        write_config_file(fixed, config_file)
        argv = ["train", "--config", config_file]
        argv += ["--resume"] * resume + ["--overwrite"] * overwrite
        log(f"starting {nproc} processes with torchrun (loopback)")
        code = launch_local(nproc, argv)
    if code != 0:
        raise StageFailure(
            f"distributed training failed (torchrun exit code {code}); the workers' "
            "messages above name the rank and the action that failed"
        )
    run_dir = Path(str(fixed.run_dir))
    summary = read_json(run_dir / "summary.json")
    return RunResult(run_dir, summary, read_epochs(run_dir))
