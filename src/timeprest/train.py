"""Training runs: configuration, the epoch loop, evaluation, metrics and the run directory.

``run_training(TrainConfig(...))`` is what ``timeprest train`` calls; it loads
the data, builds and splits the model, trains with a :class:`Pipeline`
epoch by epoch (the pipeline drains at the end of each epoch), evaluates on
the test set, and writes everything to the run directory:

=====================  =====================================================
``config.json``        the resolved configuration
``env.json``           versions, threads, device, machine
``split.json``         the stage split and per-stage cost
``epochs.jsonl``       one line per epoch: losses, accuracy, time, memory
``minibatches.jsonl``  one line per mini-batch: loss, versions, staleness
``summary.json``       final and best figures of the run
``checkpoint/``        the latest end-of-epoch checkpoint
=====================  =====================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from timeprest.errors import ConfigError
from timeprest.files import read_json, write_json
from timeprest.policy import get_method
from timeprest.policy.methods import DEFAULT_METHOD
from timeprest.schedule.costs import COST_MODES

if TYPE_CHECKING:
    from timeprest.pipeline import Pipeline
    from timeprest.report import Report

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("cpu", "cuda")
ENGINES = ("emulate", "distributed")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Flags and TOML files map onto these fields."""

    dataset: str = "fashion-mnist"
    """fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH or synthetic[:options]."""
    data_dir: str | None = None
    """Where the dataset files are (else $TIMEPREST_DATA, system dirs, the cache)."""
    image_size: int | None = None
    """Resize images to this square size (default: the dataset's own)."""
    train_limit: int | None = None
    """Use only the first N training rows (quick runs)."""
    test_limit: int | None = None
    """Use only the first N test rows."""
    model: str = "cnn"
    """mlp, cnn, resnet18, vgg16, resnet50."""
    method: str = DEFAULT_METHOD
    """A method preset (DESIGN section 6)."""
    stages: int = 4
    """Number of pipeline stages W."""
    microbatches: int | None = None
    """Micro-batches per mini-batch N (default: the method's, else W)."""
    schedule: str | None = None
    """Override the method's schedule kind (gpipe, 1f1b, nf1b, 2bw)."""
    forward: str | None = None
    """Override the forward rule (live, vertical, previous)."""
    backward: str | None = None
    """Override the backward rule (stashed, latest, intermediate)."""
    grad_rule: str | None = None
    """Override the gradient rule (graph, recompute)."""
    significance: str | None = None
    """sigma for intermediate weights: exp or inverse."""
    decay: float | None = None
    """lambda of the significance function (default 1.0)."""
    costs: str = "default"
    """Cost mode that orders asynchronous schedules: default or paper."""
    balance: str = "time"
    """Stage split: time, params, or comma-separated layer counts."""
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    """Learning rate (the default suits adam; for sgd try 0.02 with momentum 0.9)."""
    optimizer: str = "adam"
    """sgd, adam or adamw. Adam's default here tolerates the staleness of asynchronous methods."""
    momentum: float = 0.9
    """SGD momentum (ignored by adam/adamw)."""
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up, in epochs (fractions allowed)."""
    lr_schedule: str = "cosine"
    """constant or cosine (to zero at the end of the last epoch)."""
    augment: bool | None = None
    """Random crop + flip (default: on for CIFAR-like data)."""
    seed: int = 0
    device: str = "cpu"
    engine: str = "emulate"
    nproc: int | None = None
    """Processes for --engine distributed (must equal stages)."""
    threads: int | None = None
    """Intra-op threads (default: torch's for the emulator, 1 per process distributed)."""
    run_dir: str | None = None
    target_accuracy: float | None = None
    """Report the first epoch whose test accuracy reaches this (0..1)."""
    eval_batch_size: int = 1000
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ConfigError for any bad value, with the value and the fix."""
        get_method(self.method)
        for name in ("stages", "epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for name in ("microbatches", "train_limit", "test_limit", "image_size", "nproc", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):  # NaN fails both
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}"
                )
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("engine", self.engine, ENGINES)
        _choice("costs", self.costs, COST_MODES)
        if self.target_accuracy is not None and not (0 < self.target_accuracy <= 1):
            raise ConfigError(
                f"--target-accuracy is a fraction in (0, 1], got {self.target_accuracy}"
            )
        n = self.num_microbatches
        if self.batch_size < n:
            raise ConfigError(
                f"--batch-size {self.batch_size} is smaller than --microbatches {n}: "
                "each micro-batch needs at least one row"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
        if self.engine == "distributed" and self.nproc is not None and self.nproc != self.stages:
            raise ConfigError(
                f"--nproc {self.nproc} must equal --stages {self.stages}: one process per stage"
            )
        self.balance_value()

    @property
    def num_microbatches(self) -> int:
        if self.microbatches is not None:
            return self.microbatches
        return get_method(self.method).default_microbatches or self.stages

    def balance_value(self) -> Literal["time", "params"] | list[int]:
        if self.balance == "time":
            return "time"
        if self.balance == "params":
            return "params"
        try:
            counts = [int(c) for c in self.balance.split(",")]
        except ValueError:
            raise ConfigError(
                f"--balance must be time, params or layer counts like 3,3,3,3; got {self.balance!r}"
            ) from None
        return counts

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("progress", None)
        return d


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown --{flag} {value!r}: expected one of {', '.join(choices)}")


# the fields that define a run's results; a run dir holding other values holds another run
RUN_IDENTITY = (
    "dataset",
    "model",
    "method",
    "stages",
    "microbatches",
    "schedule",
    "forward",
    "backward",
    "grad_rule",
    "significance",
    "decay",
    "costs",
    "balance",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "lr_schedule",
    "augment",
    "seed",
    "train_limit",
    "test_limit",
    "image_size",
)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML config (keys are TrainConfig fields, dashes or underscores)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = key.replace("-", "_")
        if k not in types:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        base = types[k].split(" | ")[0]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
        }.get(base, False)
        if not ok:
            kind = {"int": "an integer", "float": "a number", "str": "a string"}.get(
                base, "true or false"
            )
            raise ConfigError(f"config file {path}: {key} must be {kind}, got {value!r}")
        out[k] = float(value) if base == "float" else value
    return out


def default_run_dir(cfg: TrainConfig) -> Path:
    name = f"{cfg.method}-{cfg.model}-{cfg.dataset.replace(':', '_').replace('/', '_')}"
    return Path("runs") / f"{name}-W{cfg.stages}-s{cfg.seed}"


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Create the run directory, or check that resuming it matches ``cfg``.

    Never deletes a user's run unless ``overwrite`` is given.
    """
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg_file = run_dir / "config.json"
    if cfg_file.exists():
        old = read_json(cfg_file)
        diffs = [k for k in RUN_IDENTITY if old.get(k) != getattr(cfg, k)]
        if resume:
            if diffs:
                k = diffs[0]
                raise ConfigError(
                    f"cannot resume {run_dir}: it was run with {k}={old.get(k)!r}, "
                    f"now {k}={getattr(cfg, k)!r}"
                )
        elif overwrite:
            shutil.rmtree(run_dir)
        else:
            what = (
                f"a different run ({diffs[0]}={old.get(diffs[0])!r})"
                if diffs
                else "a run with this configuration"
            )
            raise ConfigError(
                f"run dir {run_dir} already holds {what}: pass --resume to continue it, "
                "--overwrite to replace it, or --run-dir for a new one"
            )
    elif resume:
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.json)")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"run dir {run_dir} exists and is not empty: choose another --run-dir or --overwrite"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def environment(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timeprest": _version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": cfg.device,
        "cuda": torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
        "engine": cfg.engine,
    }


def _version() -> str:
    from timeprest import __version__

    return __version__


def make_optimizer(cfg: TrainConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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


@torch.no_grad()
def evaluate(
    stages: list[nn.Module], x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of the composed stages (latest weights)."""
    model = nn.Sequential(*stages)
    was_training = [m.training for m in stages]
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            out = model(xb)
            total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        for m, t in zip(stages, was_training):
            m.train(t)
    n = max(len(x), 1)
    return total_loss / n, correct / n


class Progress:
    """A one-line progress display for an epoch (stderr); plain lines when not a terminal."""

    def __init__(self, epoch: int, epochs: int, total: int, batch_size: int, enabled: bool) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.batch_size = batch_size
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.done = 0
        self.loss = float("nan")
        self._last_print = 0.0
        self._next_pct = 0.25

    def update(self, t: int, loss: float) -> None:
        self.done += 1
        self.loss = loss if math.isnan(self.loss) else 0.9 * self.loss + 0.1 * loss
        if not self.enabled:
            return
        now = time.perf_counter()
        frac = self.done / self.total
        if self.tty:
            if now - self._last_print < 0.2 and self.done < self.total:
                return
            self._last_print = now
            print("\r" + self._line(now, frac), end="", file=sys.stderr, flush=True)
        elif frac >= self._next_pct or self.done == self.total:
            self._next_pct += 0.25
            print(self._line(now, frac), file=sys.stderr, flush=True)

    def _line(self, now: float, frac: float) -> str:
        el = max(now - self.start, 1e-9)
        width = 24
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        rate = self.done * self.batch_size / el
        eta = el / max(frac, 1e-9) - el
        return (
            f"epoch {self.epoch + 1}/{self.epochs} [{bar}] {self.done}/{self.total} "
            f"loss {self.loss:.4f} {rate:,.0f} samples/s eta {eta:4.0f}s"
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def build_pipeline(cfg: TrainConfig, stages: Any, steps_per_epoch: int, **engine: Any) -> Pipeline:
    """The Pipeline a run of ``cfg`` trains (``engine``: extra options for the distributed one)."""
    from timeprest.pipeline import Pipeline

    return Pipeline(
        stages,
        method=cfg.method,
        num_microbatches=cfg.num_microbatches,
        optimizer=make_optimizer(cfg),
        loss_fn=nn.functional.cross_entropy,
        schedule=cfg.schedule,
        forward=cfg.forward,
        backward=cfg.backward,
        grad_rule=cfg.grad_rule,
        significance=cfg.significance,
        decay=cfg.decay,
        costs=cfg.costs,
        seed=cfg.seed,
        lr_lambda=lr_factor(cfg, steps_per_epoch),
        **engine,
    )


def write_run_files(
    run_dir: Path,
    cfg: TrainConfig,
    pipe: Pipeline,
    augment: bool,
    split: dict[str, Any],
    **env: Any,
) -> None:
    """config.json (with what the pipeline resolved), env.json and split.json."""
    resolved = {**cfg.to_dict(), "microbatches": cfg.microbatches, "resolved": pipe.describe()}
    resolved["resolved"]["num_microbatches"] = cfg.num_microbatches
    resolved["resolved"]["augment"] = augment
    write_json(run_dir / "config.json", resolved)
    write_json(run_dir / "env.json", {**environment(cfg), **env})
    write_json(run_dir / "split.json", split)


def saved_split(run_dir: Path, resume: bool) -> list[int] | None:
    """Layer counts of the run being resumed: its checkpoint holds the stages of that split."""
    f = run_dir / "split.json"
    if resume and f.exists():
        return list(read_json(f, "pass --overwrite to start afresh")["layer_counts"])
    return None


def trim_logs(epochs_log: Path, mb_log: Path, history: list[dict[str, Any]], done: int) -> None:
    """Rewrite the logs to what a checkpoint covers: an epoch cut short is redone."""
    epochs_log.write_text("".join(json.dumps(h) + "\n" for h in history))
    if mb_log.exists():
        kept = [ln for ln in mb_log.read_text().splitlines() if json.loads(ln)["minibatch"] < done]
        mb_log.write_text("".join(ln + "\n" for ln in kept))


def epoch_row(
    epoch: int,
    losses: list[float],
    test: tuple[float, float],
    train_time: float,
    wall: float,
    rows: int,
    lr_end: float,
    report: Report,
) -> dict[str, Any]:
    """One line of epochs.jsonl: losses, accuracy, time and the report's per-stage figures."""
    stages = range(len(report.stages))
    return {
        "epoch": epoch,
        "train_loss": sum(losses) / len(losses),
        "test_loss": test[0],
        "test_accuracy": test[1],
        "epoch_time": train_time,
        "wall_time": wall,
        "samples_per_s": rows / train_time,
        "lr_factor_end": lr_end,
        "mean_staleness": [report.mean_staleness(s) for s in stages],
        "mean_relative_distance": [report.mean_relative_distance(s) for s in stages],
        "peak_versions": [r.peak_versions for r in report.stages],
        "peak_weight_bytes": [r.peak_weight_bytes for r in report.stages],
        "weight_bytes": [r.weight_bytes for r in report.stages],
        "peak_activation_bytes": [r.peak_activation_bytes for r in report.stages],
        "optimizer_state_bytes": [r.optimizer_state_bytes for r in report.stages],
    }


def append_minibatch_log(path: Path, report: Report, epoch: int) -> None:
    """Append the report's mini-batch records (loss, versions, staleness) to minibatches.jsonl."""
    with path.open("a") as f:
        for m in report.minibatches:
            record = {
                "minibatch": m.minibatch,
                "epoch": epoch,
                "loss": m.loss,
                "forward_versions": [s.forward_versions for s in m.stages],
                "backward_version": [s.backward_version for s in m.stages],
                "staleness": [s.staleness for s in m.stages],
                "relative_distance": [s.relative_distance for s in m.stages],
            }
            f.write(json.dumps(record) + "\n")


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)


Engine = Literal["emulate", "distributed"]


def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train as ``cfg`` says; write the run directory; return the summary."""
    from timeprest.data import load_dataset, make_batches
    from timeprest.models import build_model
    from timeprest.splitting import apply_plan, plan_split
    from timeprest.tensorboard import EpochWriter

    cfg.validate()
    if cfg.engine == "distributed":
        from timeprest.engine.launch import run_distributed_training

        return run_distributed_training(cfg, resume=resume, overwrite=overwrite, log=log)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
    data = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
    train_set = data.train.take(cfg.train_limit) if cfg.train_limit else data.train
    test_set = data.test.take(cfg.test_limit) if cfg.test_limit else data.test
    augment = data.augment_default if cfg.augment is None else cfg.augment
    n = cfg.num_microbatches
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
    ).to(cfg.device)
    sample = train_set.x[: max(cfg.batch_size // n, 1)].to(cfg.device)
    balance = saved_split(run_dir, resume) or cfg.balance_value()
    plan = plan_split(model, cfg.stages, balance, sample_input=sample, device=cfg.device)
    stages = apply_plan(model, plan)
    steps_per_epoch = len(
        make_batches(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=0)
    )
    pipe = build_pipeline(cfg, stages, steps_per_epoch)
    write_run_files(run_dir, cfg, pipe, augment, plan.to_dict())
    log(
        f"{cfg.method}: {cfg.model} on {cfg.dataset} ({len(train_set)} train / {len(test_set)} "
        f"test rows), W={cfg.stages} stages, N={n} micro-batches, batch {cfg.batch_size}, "
        f"engine {cfg.engine}"
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

    epochs_log = run_dir / "epochs.jsonl"
    mb_log = run_dir / "minibatches.jsonl"
    ckpt_dir = run_dir / "checkpoint"
    start_epoch = 0
    history: list[dict[str, Any]] = []
    wall_offset = 0.0
    if resume:
        start_epoch, history, wall_offset = _resume(pipe, ckpt_dir, epochs_log, mb_log)
        log(f"resumed {run_dir} after epoch {start_epoch}")
    elif epochs_log.exists():
        epochs_log.unlink()
    if not resume and mb_log.exists():
        mb_log.unlink()
    tb = EpochWriter(run_dir, start_epoch=start_epoch)  # a no-op without tensorboard

    t_start = time.perf_counter() - wall_offset
    for epoch in range(start_epoch, cfg.epochs):
        batches = make_batches(
            train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, augment=augment
        )
        progress = Progress(epoch, cfg.epochs, len(batches), cfg.batch_size, cfg.progress)
        t0 = time.perf_counter()
        losses = pipe.train(batches, on_loss=progress.update)
        train_time = time.perf_counter() - t0
        progress.close()
        test_loss, test_acc = evaluate(
            stages, test_set.x, test_set.y, cfg.eval_batch_size, cfg.device
        )
        rep = pipe.report
        wall = time.perf_counter() - t_start
        row = epoch_row(
            epoch + 1,
            losses,
            (test_loss, test_acc),
            train_time,
            wall,
            len(train_set),
            lr_factor(cfg, steps_per_epoch)(pipe.minibatches_done - 1),
            rep,
        )
        history.append(row)
        append_minibatch_log(mb_log, rep, epoch + 1)
        # the per-mini-batch records are on disk now; keep memory flat on long runs
        # (the epoch means above were taken first)
        rep.minibatches.clear()
        with epochs_log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tb.write(row)
        _save_checkpoint(pipe, ckpt_dir, epoch + 1, history, wall)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
            f"test loss {test_loss:.4f}, test accuracy {test_acc * 100:.2f}%, "
            f"{train_time:.1f}s ({row['samples_per_s']:,.0f} samples/s)"
        )
    tb.close()
    summary = summarize(cfg, history)
    write_json(run_dir / "summary.json", summary)
    log(
        f"done: final test accuracy {summary['final_test_accuracy'] * 100:.2f}%, "
        f"best {summary['best_test_accuracy'] * 100:.2f}%, {summary['wall_time']:.1f}s; "
        f"run dir {run_dir}"
    )
    return RunResult(run_dir, summary, history)


def summarize(cfg: TrainConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's summary.json from its epoch rows (resumed epochs included)."""
    if not history:
        raise ConfigError("no epoch was trained: --epochs must be >= 1")
    target = cfg.target_accuracy
    target_epoch = next(
        (h["epoch"] for h in history if target is not None and h["test_accuracy"] >= target),
        None,
    )
    last = history[-1]
    best = max(history, key=lambda h: h["test_accuracy"])
    return {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "stages": cfg.stages,
        "microbatches": cfg.num_microbatches,
        "epochs": len(history),
        "final_test_accuracy": last["test_accuracy"],
        "final_test_loss": last["test_loss"],
        "final_train_loss": last["train_loss"],
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "target_accuracy": cfg.target_accuracy,
        "epochs_to_target": target_epoch,
        "wall_time": last["wall_time"],
        "mean_epoch_time": sum(h["epoch_time"] for h in history) / len(history),
        "mean_staleness": last["mean_staleness"],
        "mean_relative_distance": last["mean_relative_distance"],
        "peak_versions": last["peak_versions"],
        "peak_weight_bytes": last["peak_weight_bytes"],
        "peak_activation_bytes": last["peak_activation_bytes"],
        "optimizer_state_bytes": last["optimizer_state_bytes"],
    }


def _save_checkpoint(
    pipe: Any, ckpt_dir: Path, epoch: int, history: list[dict[str, Any]], wall: float
) -> None:
    save = getattr(pipe, "save_checkpoint", None)
    if save is None:
        return
    save(ckpt_dir)
    write_json(ckpt_dir / "progress.json", {"epoch": epoch, "history": history, "wall_time": wall})


def _resume(
    pipe: Any, ckpt_dir: Path, epochs_log: Path, mb_log: Path
) -> tuple[int, list[dict[str, Any]], float]:
    load = getattr(pipe, "load_checkpoint", None)
    prog_file = ckpt_dir / "progress.json"
    if load is None or not prog_file.exists():
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}")
    load(ckpt_dir)
    prog = read_json(prog_file)
    history = list(prog["history"])
    trim_logs(epochs_log, mb_log, history, pipe.minibatches_done)
    return int(prog["epoch"]), history, float(prog["wall_time"])
