"""The configuration of a training run: one typed field per setting, with its help and choices.

Every default lives here. The command line builds its flags from these fields
(:mod:`timeprest.cli.common`), a ``--config`` file (TOML or JSON) names the
same fields, and :meth:`TrainConfig.resolved` turns (method, W, N, overrides)
into a checked configuration through :func:`timeprest.policy.resolve`, the
one resolver every command uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from timeprest.errors import ConfigError
from timeprest.policy import DEFAULT_METHOD, Resolved, get_method, resolve
from timeprest.policy.remedies import CORRECTIONS, LR_RULES
from timeprest.policy.rules import BACKWARD_RULES, FORWARD_RULES, GRAD_RULES, SIGNIFICANCE_KINDS
from timeprest.report import DEFAULT_DISTANCE_EVERY
from timeprest.schedule import SCHEDULE_KINDS
from timeprest.schedule.costs import COST_MODES

OPTIMIZERS = ("sgd", "adam", "adamw", "nadam")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("cpu", "cuda")
ENGINES = ("emulate", "distributed")
TRANSPORTS = ("auto", "shm", "process-group")
PRECISIONS = ("fp32", "bf16", "fp16")
CLIP_SCOPES = ("stage", "global")

# the staleness remedies' settings (docs/design.md section 12), as policy.resolve() names them
REMEDY_OVERRIDES = (
    "correction",
    "lr_rule",
    "gamma",
    "dc_lambda",
    "gap_beta",
    "gap_eps",
    "pipemare_warmup",
)
# the fields that override parts of a method's preset, as policy.resolve() names them
POLICY_OVERRIDES = (
    "schedule",
    "forward",
    "backward",
    "grad_rule",
    "significance",
    "decay",
    *REMEDY_OVERRIDES,
)

Group = Literal["data and model", "pipeline", "optimisation", "execution"]


def option(
    default: Any,
    help: str,
    group: Group,
    *,
    choices: tuple[str, ...] = (),
    flag: bool = True,
    repeat: bool = False,
) -> Any:
    """A TrainConfig field: its default, the help its flag shows, and its allowed values.

    The help text is the field's documentation; ``--help`` shows it with the
    default. ``choices`` are checked by :meth:`TrainConfig.validate` (not by
    argparse, so a bad value is one clear line naming the flag). ``repeat``: the
    flag may be given several times; the values are joined with commas.
    """
    meta = {"help": help, "group": group, "choices": choices, "flag": flag, "repeat": repeat}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run depends on. Flags and config files map onto these fields."""

    dataset: str = option(
        "fashion-mnist",
        "fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH, synthetic[:options], "
        "or byte-level text for --model gpt: shakespeare or text:PATH",
        "data and model",
    )
    data_dir: str | None = option(
        None, "where the dataset files are (else $TIMEPREST_DATA, system dirs, the cache)",
        "data and model",
    )  # fmt: skip
    image_size: int | None = option(
        None, "resize images to this square size (default: the dataset's own)", "data and model"
    )
    train_limit: int | None = option(
        None,
        "train on N training rows drawn at random from --seed (the same rows on every run)",
        "data and model",
    )
    test_limit: int | None = option(
        None, "test on N test rows drawn at random from --seed", "data and model"
    )
    model: str = option("cnn", "mlp, cnn, resnet18, vgg16, resnet50, gpt", "data and model")
    model_opt: str | None = option(
        None,
        "a model setting KEY=VALUE (repeatable; gpt: vocab_size, block_size, n_layer, n_head, "
        "n_embd, dropout, tie_embeddings)",
        "data and model",
        repeat=True,
    )
    augment: bool | None = option(
        None, "random crop + flip (default: on for CIFAR-like data)", "data and model"
    )
    method: str = option(DEFAULT_METHOD, "a method preset (docs/design.md section 6)", "pipeline")
    stages: int = option(4, "number of pipeline stages W", "pipeline")
    microbatches: int | None = option(
        None, "micro-batches per mini-batch N (default: the method's, else W)", "pipeline"
    )
    schedule: str | None = option(
        None, "override the method's schedule", "pipeline", choices=SCHEDULE_KINDS
    )
    forward: str | None = option(
        None, "override the forward rule", "pipeline", choices=FORWARD_RULES
    )
    backward: str | None = option(
        None, "override the backward rule", "pipeline", choices=BACKWARD_RULES
    )
    grad_rule: str | None = option(
        None, "override the gradient rule", "pipeline", choices=GRAD_RULES
    )
    significance: str | None = option(
        None, "sigma of intermediate weights (I-TiMePReSt)", "pipeline", choices=SIGNIFICANCE_KINDS
    )
    decay: float | None = option(
        None, "lambda of the significance function (default 1.0)", "pipeline"
    )
    correction: str | None = option(
        None, "override the stale-gradient correction", "pipeline", choices=CORRECTIONS
    )
    lr_rule: str | None = option(
        None, "override the per-stage learning-rate rule", "pipeline", choices=LR_RULES
    )
    gamma: float | None = option(None, "decay of the weight velocity (default 0.9)", "pipeline")
    dc_lambda: float | None = option(None, "lambda of the DC correction (default 0.04)", "pipeline")
    gap_beta: float | None = option(
        None, "decay of Gap-Aware's step average (default 0.999)", "pipeline"
    )
    gap_eps: float | None = option(
        None, "epsilon added to Gap-Aware's C (default 1e-8)", "pipeline"
    )
    pipemare_warmup: int | None = option(
        None, "updates K until PipeMare's rate rule fades (default 1000)", "pipeline"
    )
    costs: str = option(
        "default", "cost mode that orders asynchronous schedules", "pipeline", choices=COST_MODES
    )
    balance: str = option(
        "time", "stage split: time, params, or layer counts like 3,3,3,3", "pipeline"
    )
    epochs: int = option(3, "epochs to train", "optimisation")
    batch_size: int = option(128, "rows per mini-batch", "optimisation")
    lr: float = option(
        1e-3,
        "learning rate (the default suits adam; for sgd try 0.02 with momentum 0.9)",
        "optimisation",
    )
    optimizer: str = option(
        "adam",
        "the optimizer (adam tolerates the staleness of asynchronous methods)",
        "optimisation",
        choices=OPTIMIZERS,
    )
    momentum: float = option(
        0.9, "SGD momentum; nadam's beta1 (ignored by adam/adamw)", "optimisation"
    )
    weight_decay: float = option(0.0, "weight decay", "optimisation")
    warmup_epochs: float = option(
        0.0, "linear learning-rate warm-up, in epochs (fractions allowed)", "optimisation"
    )
    lr_schedule: str = option(
        "cosine",
        "constant, or cosine to zero at the end of the last epoch",
        "optimisation",
        choices=LR_SCHEDULES,
    )
    clip_grad_norm: float | None = option(
        None, "clip the gradient norm to this before every update", "optimisation"
    )
    clip_scope: str = option(
        "stage",
        "the norm --clip-grad-norm bounds: each stage's own, or the whole model's (flush "
        "schedules, emulator)",
        "optimisation",
        choices=CLIP_SCOPES,
    )
    precision: str = option(
        "fp32",
        "fp32, or bf16 or fp16 autocast (CPU and CUDA; fp16 with a static --loss-scale); the "
        "weights and the optimizer state stay float32",
        "optimisation",
        choices=PRECISIONS,
    )
    loss_scale: float | None = option(
        None,
        "fp16: the static loss scale, a power of two (default 1024); an overflow stops the run",
        "optimisation",
    )
    seed: int = option(0, "seed of the weights, the data order and the limits", "optimisation")
    device: str = option("cpu", "device to train on", "execution", choices=DEVICES)
    engine: str = option(
        "emulate",
        "emulate (one process) or distributed (one process per stage)",
        "execution",
        choices=ENGINES,
    )
    nproc: int | None = option(
        None,
        "processes for --engine distributed (must equal --stages x --data-parallel)",
        "execution",
    )
    data_parallel: int = option(
        1,
        "replicas of the pipeline, each on 1/D of every mini-batch, gradients combined "
        "before each update (distributed: D x stages processes)",
        "execution",
    )
    threads: int | None = option(
        None,
        "intra-op threads (default: torch's for the emulator, 1 per process distributed)",
        "execution",
    )
    transport: str = option(
        "auto",
        "--engine distributed: how stages exchange messages; auto is shared memory when "
        "every process is on this host (CPU), else the process group (gloo / NCCL)",
        "execution",
        choices=TRANSPORTS,
    )
    run_dir: str | None = option(
        None, "where the run is written", "execution", flag=False
    )  # train's own flag: compare chooses one per method
    target_accuracy: float | None = option(
        None, "report the first epoch whose test accuracy reaches this (0..1)", "execution"
    )
    eval_batch_size: int = option(1000, "rows per evaluation batch", "execution")
    eval_every: int | None = option(
        None,
        "also evaluate every K mini-batches (emulator: in the run, on every stage's latest "
        "weights, without a drain; distributed: the pipeline drains every K mini-batches)",
        "execution",
    )
    distance_every: int = option(
        DEFAULT_DISTANCE_EVERY,
        "measure the relative distance of the backward weights (a pass over them) every K "
        "mini-batches; 1 for every one",
        "execution",
    )
    progress: bool = option(True, "show a progress bar", "execution", flag=False)

    def validate(self) -> None:
        """Raise ConfigError for any bad value, with the value and the fix."""
        from timeprest.models import check_model_name
        from timeprest.tasks import task_for

        get_method(self.method)
        check_model_name(self.model)  # before a distributed run starts its processes

        task_for(self)  # a model that does not fit the dataset's task (gpt on images)
        for name in ("stages", "epochs", "batch_size", "eval_batch_size", "data_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{_flag(name)} must be an integer >= 1, got {v!r}")
        for name in (
            "microbatches", "train_limit", "test_limit", "image_size", "nproc", "threads",
            "eval_every", "distance_every",
        ):  # fmt: skip
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{_flag(name)} must be an integer >= 1, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):  # NaN fails both
                raise ConfigError(f"{_flag(name)} must be a finite number >= 0, got {v}")
        if self.clip_grad_norm is not None and not (
            math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0
        ):
            raise ConfigError(
                f"--clip-grad-norm must be a positive number, got {self.clip_grad_norm}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["choices"] and value is not None:
                choice(f.name, value, f.metadata["choices"])
        if self.target_accuracy is not None and not (0 < self.target_accuracy <= 1):
            raise ConfigError(
                f"--target-accuracy is a fraction in (0, 1], got {self.target_accuracy}"
            )
        n = self.resolved(warn=False).num_microbatches
        check_batch_rows("--batch-size", self.batch_size, n, self.data_parallel)
        if self.precision == "fp16" or self.loss_scale is not None:
            from timeprest.stage.precision import check_loss_scale

            check_loss_scale(self.precision, self.loss_scale)
        from timeprest.device import check_available

        check_available(self.device)
        procs = self.stages * self.data_parallel
        if self.engine == "distributed" and self.nproc is not None and self.nproc != procs:
            if self.data_parallel == 1:
                raise ConfigError(
                    f"--nproc {self.nproc} must equal --stages {self.stages}: one process per stage"
                )
            raise ConfigError(
                f"--nproc {self.nproc} must equal --stages {self.stages} x --data-parallel "
                f"{self.data_parallel} = {procs}: one process per stage of each replica"
            )
        self.balance_value()

    def resolved(self, *, warn: bool = True) -> Resolved:
        """The method, schedule, policy and N of this run, every constraint checked."""
        return resolve(self.method, self.stages, self.microbatches, **self.overrides(), warn=warn)

    def overrides(self) -> dict[str, Any]:
        """The parts of the method's preset this run replaces (None: the method's own)."""
        return {name: getattr(self, name) for name in POLICY_OVERRIDES}

    @property
    def num_microbatches(self) -> int:
        """N: --microbatches, else the method's default (PipeDream 1), else W."""
        return self.resolved(warn=False).num_microbatches

    def balance_value(self) -> Literal["time", "params"] | list[int]:
        return parse_balance(self.balance)

    def to_dict(self) -> dict[str, Any]:
        """The fields config.json records (the progress display is not part of a run)."""
        d = dataclasses.asdict(self)
        d.pop("progress", None)
        return d


def parse_balance(text: str) -> Literal["time", "params"] | list[int]:
    """``--balance``: ``time``, ``params`` or comma-separated layer counts per stage."""
    if text == "time":
        return "time"
    if text == "params":
        return "params"
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--balance must be time, params or layer counts like 3,3,3,3; got {text!r}"
        ) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError unless ``value`` is one of ``choices``; ``name`` is the field or flag."""
    if value not in choices:
        raise ConfigError(f"unknown {_flag(name)} {value!r}: expected one of {', '.join(choices)}")


# the fields that define a run's results; a run dir holding other values holds another run
RUN_IDENTITY = (
    "dataset",
    "model",
    "model_opt",
    "method",
    "stages",
    "microbatches",
    *POLICY_OVERRIDES,
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
    "clip_grad_norm",
    "clip_scope",
    "precision",
    "loss_scale",
    "eval_every",
)


def check_batch_rows(what: str, rows: int, num_microbatches: int, data_parallel: int) -> None:
    """Every micro-batch of every replica needs a row: ``rows >= D * N``."""
    n, d = num_microbatches, data_parallel
    if rows < n * d:
        times = f"--data-parallel {d} x --microbatches {n}" if d > 1 else f"--microbatches {n}"
        raise ConfigError(
            f"{what} {rows} is smaller than {times}: each micro-batch needs at least one row"
        )


def load_config_file(path: str) -> dict[str, Any]:
    """Read a config file: TOML, or JSON when the name ends in ``.json``.

    Keys are TrainConfig fields (dashes or underscores); each value must have
    the field's type. Returns the values by field name.
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = json.load(f) if path.endswith(".json") else tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a table of settings")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
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


def write_config_file(cfg: TrainConfig, path: str) -> None:
    """Write ``cfg`` as a JSON config file that :func:`load_config_file` reads back equal.

    Unset (None) fields are left out: their default is None too.
    """
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    with open(path, "w") as f:
        json.dump(values, f)
