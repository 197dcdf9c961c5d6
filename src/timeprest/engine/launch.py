"""Starting distributed runs: torchrun on loopback, and ``timeprest train``'s distributed loop.

Three ways to run ``timeprest train`` with one process per stage::

    torchrun --nproc-per-node 4 -m timeprest train --engine distributed --stages 4 ...
    timeprest train --engine distributed --nproc 4 --stages 4 ...   # starts torchrun itself
    python -c "from timeprest.engine.launch import launch_local; \\
               launch_local(4, ['train', '--engine', 'distributed', '--stages', '4'])"

``launch_local`` runs ``torch.distributed.run`` (torchrun) in standalone mode:
a rendezvous on this machine's loopback at a free port, ``nproc`` workers.
:func:`run_distributed_training` is what ``run_training`` calls for
``--engine distributed``: outside a torchrun job it relaunches itself under
``launch_local``; inside one it trains this rank's stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from timeprest.engine.runtime import (
    DistributedRuntime,
    RuntimeOptions,
    StageFailure,
    in_distributed_job,
)
from timeprest.errors import ConfigError

if TYPE_CHECKING:
    from timeprest.train import RunResult, TrainConfig

__all__ = [
    "in_distributed_job",
    "launch_local",
    "run_distributed_training",
    "torchrun_command",
]


def torchrun_command(
    nproc: int, argv: Sequence[str], *, module: str | None = "timeprest"
) -> list[str]:
    """The torchrun command line that runs ``python -m module argv`` in ``nproc`` processes.

    ``module=None`` runs a script: ``argv[0]`` is its path.
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"the number of processes must be an integer >= 1, got {nproc!r}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on this machine, at a free port
        f"--nproc-per-node={nproc}",
    ]
    if module is not None:
        cmd += ["-m", module]
    return cmd + list(argv)


def launch_local(
    nproc: int,
    argv: Sequence[str],
    *,
    module: str | None = "timeprest",
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> int:
    """Run ``python -m module argv`` as ``nproc`` torchrun workers on loopback; their exit code.

    ``launch_local(4, ["train", "--engine", "distributed", "--stages", "4"])`` is
    ``timeprest train`` with one process per stage. Each worker gets one
    intra-op thread unless ``OMP_NUM_THREADS`` is set. Returns torchrun's exit
    code: 0 when every worker succeeded.
    """
    cmd = torchrun_command(nproc, argv, module=module)
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", "1")
    environment.update(env or {})
    try:
        return subprocess.run(cmd, env=environment, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        return 124


# -- timeprest train --engine distributed ----------------------------------------------------


def run_distributed_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """``run_training`` with one process per stage.

    Outside a torchrun job: starts ``cfg.nproc or cfg.stages`` workers with
    :func:`launch_local`, waits, and returns the run's result read from its
    run directory. Inside a job (``torchrun ... -m timeprest train``): trains
    this rank's stage; every rank returns the same result, rank 0 writes the
    run directory and logs.
    """
    if not in_distributed_job():
        return _launch_and_collect(cfg, resume=resume, overwrite=overwrite, log=log)
    return _train_rank(cfg, resume=resume, overwrite=overwrite, log=log)


def _launch_and_collect(
    cfg: TrainConfig, *, resume: bool, overwrite: bool, log: Callable[[str], None]
) -> RunResult:
    from timeprest.train import RunResult, default_run_dir

    nproc = cfg.nproc or cfg.stages
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    fields = dataclasses.asdict(cfg)
    fields["run_dir"] = str(run_dir)
    with tempfile.TemporaryDirectory(prefix="timeprest-launch-") as tmp:
        spec = Path(tmp) / "config.json"
        spec.write_text(json.dumps({"config": fields, "resume": resume, "overwrite": overwrite}))
        log(f"starting {nproc} processes with torchrun (loopback)")
        code = launch_local(nproc, [str(spec)], module="timeprest.engine.launch")
    if code != 0:
        raise StageFailure(
            f"distributed training failed (torchrun exit code {code}); the workers' "
            "messages above name the rank and the action that failed"
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    return RunResult(run_dir, summary, epochs)


def _broadcast(job: DistributedRuntime, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (over the control group)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=job.group)
    return box[0]


def _train_rank(
    cfg: TrainConfig, *, resume: bool, overwrite: bool, log: Callable[[str], None]
) -> RunResult:

    from timeprest.data import load_dataset, make_batches
    from timeprest.files import write_json
    from timeprest.models import build_model
    from timeprest.splitting import apply_plan, plan_split
    from timeprest.train import (
        Progress,
        RunResult,
        append_minibatch_log,
        build_pipeline,
        epoch_row,
        evaluate,
        lr_factor,
        prepare_run_dir,
        saved_split,
        summarize,
        trim_logs,
        write_run_files,
    )

    opts = RuntimeOptions(
        num_threads=cfg.threads or 1, backend="nccl" if cfg.device == "cuda" else "gloo"
    )
    job = DistributedRuntime(opts)  # collective helpers for the set-up below
    rank, w = job.rank, job.world_size
    first, last = rank == 0, rank == w - 1
    if w != cfg.stages:
        raise ConfigError(
            f"--stages {cfg.stages} but the job has {w} processes: one process per stage "
            f"(torchrun --nproc-per-node {cfg.stages})"
        )
    say = log if first else (lambda _: None)
    run_dir = job.agreed(
        "preparing the run directory",
        lambda: prepare_run_dir(cfg, resume=resume, overwrite=overwrite) if first else None,
    )
    run_dir = Path(_broadcast(job, str(run_dir) if first else None))

    # the first and the last stage read the data; rank 0 loads first (it may download)
    data = job.agreed(
        "loading the dataset",
        lambda: (
            load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
            if first
            else None
        ),
    )
    if last and not first:
        data = job.agreed(
            "loading the dataset",
            lambda: load_dataset(
                cfg.dataset, cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed
            ),
        )
    else:
        job.barrier("loading the dataset")
    train_set = test_set = None
    if data is not None:
        train_set = data.train.take(cfg.train_limit) if cfg.train_limit else data.train
        test_set = data.test.take(cfg.test_limit) if cfg.test_limit else data.test
    meta = _broadcast(
        job,
        None
        if data is None or train_set is None
        else {
            "in_channels": data.in_channels,
            "num_classes": data.num_classes,
            "image_size": data.image_size,
            "augment": data.augment_default,
            "rows": (len(train_set), len(test_set or [])),
        },
    )
    augment = meta["augment"] if cfg.augment is None else cfg.augment
    n = cfg.num_microbatches

    # every rank builds the same model from the seed; rank 0 chooses the split (timing
    # differs between processes) and every rank keeps its own stage
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model,
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        image_size=meta["image_size"],
    )

    def choose_split() -> Any:
        balance: Any = saved_split(run_dir, resume) or cfg.balance_value()
        sample = train_set.x[: max(cfg.batch_size // n, 1)] if train_set is not None else None
        return plan_split(model, cfg.stages, balance, sample_input=sample)

    plan = job.agreed("splitting the model", lambda: choose_split() if first else None)
    plan = _broadcast(job, plan)
    stages = apply_plan(model, plan)
    train_rows = meta["rows"][0]
    steps_per_epoch = -(-train_rows // cfg.batch_size)
    pipe = build_pipeline(
        cfg, lambda s: stages[s], steps_per_epoch, engine="distributed", runtime=opts
    )
    if first:
        write_run_files(run_dir, cfg, pipe, augment, plan.to_dict(), processes=w)
    say(
        f"{cfg.method}: {cfg.model} on {cfg.dataset} ({train_rows} train / {meta['rows'][1]} "
        f"test rows), W={cfg.stages} stages in {w} processes, N={n} micro-batches, "
        f"batch {cfg.batch_size}, engine distributed"
    )
    epochs_log, mb_log = run_dir / "epochs.jsonl", run_dir / "minibatches.jsonl"
    ckpt_dir = run_dir / "checkpoint"
    start_epoch, history, wall_offset = 0, [], 0.0
    if resume:
        pipe.load_checkpoint(ckpt_dir)
        progress_file = ckpt_dir / "progress.json"
        prog = _broadcast(job, json.loads(progress_file.read_text()) if first else None)
        start_epoch, history = int(prog["epoch"]), list(prog["history"])
        wall_offset = float(prog["wall_time"])
        if first:
            trim_logs(epochs_log, mb_log, history, pipe.minibatches_done)
        say(f"resumed {run_dir} after epoch {start_epoch}")
    elif first:
        for old in (epochs_log, mb_log):
            if old.exists():
                old.unlink()

    t_start = time.perf_counter() - wall_offset
    own = stages[rank]
    device = pipe.runners[0].device
    if first:  # rank 0 evaluates the whole model: its copies of the other stages join it
        for s, module in enumerate(stages):
            if s != rank:
                module.to(device)
    for epoch in range(start_epoch, cfg.epochs):
        batches = (
            make_batches(
                train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, augment=augment
            )
            if train_set is not None
            else None
        )
        # the last stage knows each loss first: it shows the progress line
        progress = Progress(
            epoch, cfg.epochs, steps_per_epoch, cfg.batch_size, cfg.progress and last
        )
        t0 = time.perf_counter()
        losses = pipe.train(batches, on_loss=progress.update if last else None)  # type: ignore[arg-type]
        train_time = time.perf_counter() - t0
        progress.close()
        # rank 0 evaluates the whole model with every stage's latest weights
        states: list[Any] | None = [None] * w if first else None
        mine = {k: v.cpu() for k, v in own.state_dict().items()}
        dist.gather_object(mine, states, dst=0, group=job.group)
        test = None
        if first:
            assert test_set is not None and states is not None
            for s, st in enumerate(states):
                if s != rank:
                    stages[s].load_state_dict(st)
            test = evaluate(stages, test_set.x, test_set.y, cfg.eval_batch_size, str(device))
        test_loss, test_acc = _broadcast(job, test)
        rep = pipe.report
        row = epoch_row(
            epoch + 1,
            losses,
            (test_loss, test_acc),
            train_time,
            time.perf_counter() - t_start,
            train_rows,
            lr_factor(cfg, steps_per_epoch)(pipe.minibatches_done - 1),
            rep,
        )
        row = _broadcast(job, row)  # rank 0's clock for every rank's history
        history.append(row)
        if first:
            append_minibatch_log(mb_log, rep, epoch + 1)
            with epochs_log.open("a") as out:
                out.write(json.dumps(row) + "\n")
        rep.minibatches.clear()
        pipe.save_checkpoint(ckpt_dir)
        if first:
            write_json(
                ckpt_dir / "progress.json",
                {"epoch": epoch + 1, "history": history, "wall_time": row["wall_time"]},
            )
        job.barrier("writing the checkpoint")
        say(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
            f"test loss {test_loss:.4f}, test accuracy {test_acc * 100:.2f}%, "
            f"{train_time:.1f}s ({row['samples_per_s']:,.0f} samples/s)"
        )
    summary = summarize(cfg, history)
    if first:
        write_json(run_dir / "summary.json", summary)
    say(
        f"done: final test accuracy {summary['final_test_accuracy'] * 100:.2f}%, "
        f"best {summary['best_test_accuracy'] * 100:.2f}%, {summary['wall_time']:.1f}s; "
        f"run dir {run_dir}"
    )
    job.barrier("finishing the run")
    return RunResult(run_dir, summary, history)


def _worker_main(argv: Sequence[str]) -> int:
    """Entry of the workers :func:`run_distributed_training` launches: a JSON run spec."""
    from timeprest.errors import TimeprestError
    from timeprest.train import TrainConfig, run_training

    spec = json.loads(Path(argv[0]).read_text())
    try:
        cfg = TrainConfig(**spec["config"])
        run_training(cfg, resume=spec["resume"], overwrite=spec["overwrite"])
    except TimeprestError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"timeprest train: error: {first}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
