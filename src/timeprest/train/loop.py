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

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from timeprest.errors import ConfigError
from timeprest.files import read_json, write_json
from timeprest.report import MinibatchReport
from timeprest.train.config import TrainConfig, write_config_file
from timeprest.train.context import RunContext, make_context
from timeprest.train.optim import lr_factor, make_optimizer, no_decay_ids
from timeprest.train.progress import EpochProgress
from timeprest.train.records import (
    EpochRow,
    append_epoch,
    append_eval,
    append_minibatches,
    describe_summary,
    read_epochs,
    summarize,
    trim_logs,
)
from timeprest.train.rundir import (
    Progress,
    clear_replaced_run,
    prepare_run_dir,
    run_dir_of,
    saved_split,
    write_run_files,
)

if TYPE_CHECKING:
    from timeprest.pipeline import Pipeline
    from timeprest.splitting import SplitPlan
    from timeprest.stage.sync import Tied
    from timeprest.tasks import DataInfo, Metrics, Task


@dataclass
class RunResult:
    """What a run produced: its directory, summary.json and its epoch rows."""

    run_dir: Path
    summary: dict[str, Any]
    epochs: list[EpochRow] = field(default_factory=list)


def build_pipeline(
    cfg: TrainConfig,
    steps_per_epoch: int,
    *,
    task: Task,
    all_stages: Sequence[nn.Module | None],
    tied: Sequence[Tied] = (),
    **options: Any,
) -> Pipeline:
    """The Pipeline a run of ``cfg`` trains (``options``: its stages and engine options).

    ``all_stages`` are the stage modules (for the optimizer's parameter groups),
    ``tied`` the tensors several stages hold a copy of.
    """
    from timeprest.pipeline import Pipeline

    # AdamW's groups without decay are the transformer convention (docs/design.md 11); image
    # runs keep one group, decaying every parameter, as they always have
    no_decay = no_decay_ids(all_stages, tied) if task.name == "lm" else frozenset()
    return Pipeline(
        method=cfg.method,
        num_microbatches=cfg.num_microbatches,
        optimizer=make_optimizer(cfg, no_decay),
        loss_fn=task.loss_fn,
        **cfg.overrides(),
        costs=cfg.costs,
        seed=cfg.seed,
        lr_lambda=lr_factor(cfg, steps_per_epoch),
        precision=cfg.precision,
        loss_scale=cfg.loss_scale,
        clip_grad_norm=cfg.clip_grad_norm,
        clip_scope=cfg.clip_scope,
        tied=tied,
        data_parallel=cfg.data_parallel,
        distance_every=cfg.distance_every,
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
    ctx = make_context(
        cfg.engine, cfg.device, cfg.threads, cfg.stages, cfg.data_parallel, cfg.transport
    )
    return _train(cfg, ctx, resume=resume, overwrite=overwrite, log=log if ctx.writes else _quiet)


def _quiet(_: str) -> None:
    pass


def _load_data(cfg: TrainConfig, task: Task) -> tuple[Any, Any, DataInfo]:
    """The train and held-out data of the run (--train-limit/--test-limit applied)."""
    return task.load()


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
    from timeprest.tasks import task_for

    options = task_for(cfg).model_options()
    torch.manual_seed(cfg.seed)
    return build_model(
        cfg.model,
        in_channels=shape.in_channels,
        num_classes=shape.num_classes,
        image_size=shape.image_size,
        options=options,
    ).to(device)


def split_plan(
    cfg: TrainConfig, model: nn.Module, train: Any, balance: Any, n: int, device: str
) -> SplitPlan:
    """The split of ``model``; ``balance="time"`` times one micro-batch of ``n`` per mini-batch."""
    from timeprest.splitting import plan_split
    from timeprest.tasks import task_for

    sample = task_for(cfg).sample_input(train, max(cfg.batch_size // n, 1)).to(device)
    return plan_split(model, cfg.stages, balance, sample_input=sample, device=device)


def _train(
    cfg: TrainConfig,
    ctx: RunContext,
    *,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], None],
) -> RunResult:
    from timeprest.data import num_batches
    from timeprest.splitting import apply_plan_untied
    from timeprest.tasks import task_for
    from timeprest.train.tensorboard import EpochWriter

    task = task_for(cfg)
    run_dir = Path(
        ctx.on_writer(
            "preparing the run directory",
            lambda: str(prepare_run_dir(cfg, resume=resume, overwrite=overwrite)),
        )
    )
    # the first and the last stage read the data; the others learn their shape
    loaded = ctx.on_readers("loading the dataset", lambda: _load_data(cfg, task))
    train_set, test_set = (loaded[0], loaded[1]) if loaded else (None, None)
    info: DataInfo = ctx.broadcast(loaded[2] if loaded else None)
    n = cfg.num_microbatches

    # every process builds the same model from the seed; the writer chooses the split
    # (timings differ between processes) and every process keeps what it runs
    model = seeded_model(cfg, info, ctx.model_device)

    def choose_split() -> Any:
        assert train_set is not None, "the writer reads the data"
        balance = saved_split(run_dir, resume) or cfg.balance_value()
        return split_plan(cfg, model, train_set, balance, n, ctx.model_device)

    plan = ctx.on_writer("splitting the model", choose_split)
    # a tensor two stages use (tied embeddings) becomes one copy per stage
    stages, tied = apply_plan_untied(model, plan)
    short = info.train_rows % cfg.batch_size  # a last, smaller mini-batch each epoch
    if short and short < n * cfg.data_parallel:
        raise ConfigError(
            f"the last mini-batch of each epoch has {short} rows ({info.train_rows} rows in "
            f"mini-batches of {cfg.batch_size}), fewer than the {cfg.data_parallel * n} "
            "micro-batches of all replicas: change --batch-size or --train-limit"
        )
    steps_per_epoch = num_batches(info.train_rows, cfg.batch_size)
    pipe = build_pipeline(
        cfg, steps_per_epoch, task=task, all_stages=stages, tied=tied,
        **ctx.pipeline_options(stages),
    )  # fmt: skip
    where = f"in {ctx.world_size} processes" if ctx.world_size > 1 else "stages"
    log(
        f"{cfg.method}: {cfg.model} on {cfg.dataset} ({info.description}), W={cfg.stages} "
        f"{where}, N={n} micro-batches, batch {cfg.batch_size}, engine {cfg.engine}"
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
    evals_log = run_dir / "evals.jsonl"
    ckpt_dir = run_dir / "checkpoint"
    done = Progress(0, [], 0.0)
    if resume:
        done = ctx.on_writer("reading the checkpoint", lambda: Progress.read(ckpt_dir))
        pipe.load_checkpoint(ckpt_dir)
        if ctx.writes:
            trim_logs(epochs_log, mb_log, done.history, pipe.minibatches_done, evals_log)
        log(f"resumed {run_dir} after epoch {done.epoch}")

    def write_files() -> None:
        if not resume:  # every check has passed: only now is a replaced run removed
            clear_replaced_run(run_dir)
        # a resumed run keeps the split.json that chose its stages
        split = None if resume and (run_dir / "split.json").exists() else plan.to_dict()
        write_run_files(run_dir, cfg, pipe.describe(), info.augment, split, **ctx.env())

    ctx.on_writer("writing the run files", write_files)
    tb = EpochWriter(run_dir, start_epoch=done.epoch, enabled=ctx.writes)  # no-op without TB
    history = list(done.history)
    factor = lr_factor(cfg, steps_per_epoch)

    def evaluate() -> Metrics:
        return ctx.evaluate(pipe, stages, task, test_set, cfg.eval_batch_size)

    t_start = time.perf_counter() - done.wall_time
    for epoch in range(done.epoch, cfg.epochs):
        batches = None if train_set is None else task.train_batches(train_set, info, epoch)
        progress = EpochProgress(
            epoch, cfg.epochs, steps_per_epoch, cfg.batch_size, cfg.progress and ctx.shows_progress
        )
        t0 = time.perf_counter()
        losses: list[float] = []
        eval_time = 0.0
        first = pipe.minibatches_done
        every = cfg.eval_every or steps_per_epoch
        # In one process every stage is here: a mid-epoch evaluation reads each stage's
        # latest weights at the moment mini-batch t's loss is known, without a drain
        # (no gradient, no randomness, training flags restored: the run is unchanged).
        # Across processes the stages are elsewhere: the epoch is trained in pieces of
        # K mini-batches, each drained before the evaluation.
        midway = ctx.world_size == 1 and every < steps_per_epoch

        spent = [0.0]  # seconds of mid-epoch evaluations in this epoch

        def on_loss(
            t: int, loss: float, progress: EpochProgress = progress, first: int = first,
            epoch: int = epoch, midway: bool = midway, every: int = every,
            spent: list[float] = spent,
        ) -> None:  # fmt: skip
            if ctx.shows_progress:
                progress.update(t, loss)
            done_here = t + 1 - first
            if midway and done_here % every == 0 and done_here < steps_per_epoch:
                t_eval = time.perf_counter()
                with torch.random.fork_rng():
                    metrics = evaluate()
                spent[0] += time.perf_counter() - t_eval
                append_eval(evals_log, epoch + 1, t + 1, metrics)

        piece = steps_per_epoch if midway else every
        records: list[MinibatchReport] = []
        for lo in range(0, steps_per_epoch, piece):
            hi = min(lo + piece, steps_per_epoch)
            part = None if batches is None else (batches[i] for i in range(lo, hi))
            losses += pipe.train(
                part,  # type: ignore[arg-type]  # None where this stage reads no data
                on_loss=on_loss if ctx.shows_progress or midway else None,
                num_minibatches=hi - lo,
            )
            if ctx.writes:
                append_minibatches(mb_log, pipe.report, epoch + 1)
            # the epoch row's staleness and distance means cover every piece of the epoch
            records.extend(pipe.report.minibatches)
            if not midway and hi < steps_per_epoch:  # the epoch's last evaluation is its row's
                t_eval = time.perf_counter()
                metrics = evaluate()
                eval_time += time.perf_counter() - t_eval
                if ctx.writes:
                    append_eval(evals_log, epoch + 1, pipe.minibatches_done, metrics)
        train_time = time.perf_counter() - t0 - eval_time - spent[0]
        progress.close()
        test = evaluate()
        rep = pipe.report
        rep.minibatches = records
        row = EpochRow.from_report(
            epoch + 1,
            losses,
            test,
            train_time,
            time.perf_counter() - t_start,
            info.train_rows,
            factor(pipe.minibatches_done - 1),
            rep,
            task=task.name,
        )
        rep.minibatches = []  # on disk now: memory stays flat on long runs
        row = ctx.broadcast(row)  # the writer's clock for every process's history
        history.append(row)
        if ctx.writes:
            append_epoch(epochs_log, row)
            append_eval(evals_log, epoch + 1, pipe.minibatches_done, test)
            tb.write(row)
        pipe.save_checkpoint(ckpt_dir)
        if ctx.writes:
            Progress(epoch + 1, history, row.wall_time).write(ckpt_dir)
        ctx.barrier("writing the checkpoint")
        log(f"epoch {epoch + 1}/{cfg.epochs}: {row.describe()}, {train_time:.1f}s "
            f"({row.samples_per_s:,.0f} samples/s)")  # fmt: skip
    tb.close()
    summary = summarize(cfg, history)
    if ctx.writes:
        write_json(run_dir / "summary.json", summary)
    log(f"done: {describe_summary(summary)}, {summary['wall_time']:.1f}s; run dir {run_dir}")
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

    Starts ``cfg.nproc or cfg.stages x cfg.data_parallel`` workers on loopback with
    :func:`timeprest.engine.launch.launch_local`, each running this module's loop
    for its stage from the same configuration (a temporary config file), waits,
    and returns the result read back from the run directory.
    """
    from timeprest.engine.launch import StageFailure, launch_local

    nproc = cfg.nproc or cfg.stages * cfg.data_parallel
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
