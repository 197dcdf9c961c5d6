"""The run directory: where a run is written, the checks before writing, and its files.

=====================  =====================================================
``config.json``        the resolved configuration
``env.json``           versions, threads, device, machine
``split.json``         the stage split and per-stage cost
``epochs.jsonl``       one line per epoch: losses, accuracy, time, memory
``minibatches.jsonl``  one line per mini-batch: loss, versions, staleness
``summary.json``       final and best figures of the run
``checkpoint/``        the latest end-of-epoch checkpoint, with ``progress.json``
=====================  =====================================================

A user's run is never deleted unless ``--overwrite`` says so, and then only what
the run wrote; a directory that holds anything else but no run is never written into.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from timeprest._version import __version__
from timeprest.errors import ConfigError
from timeprest.files import read_json, read_json_object, write_json
from timeprest.train.config import RUN_IDENTITY, TrainConfig
from timeprest.train.records import EpochRow


def default_run_dir(cfg: TrainConfig) -> Path:
    name = f"{cfg.method}-{cfg.model}-{cfg.dataset.replace(':', '_').replace('/', '_')}"
    return Path("runs") / f"{name}-W{cfg.stages}-s{cfg.seed}"


def run_dir_of(cfg: TrainConfig) -> Path:
    """``--run-dir``, else the default name from the method, model, data, W and seed."""
    return Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)


RUN_FILES = (
    "config.json",
    "env.json",
    "split.json",
    "summary.json",
    "epochs.jsonl",
    "minibatches.jsonl",
    "evals.jsonl",
)
RUN_FOLDERS = ("checkpoint", "tensorboard", "plots")
"""With :data:`RUN_FILES`, what a run writes into its directory (``plots``: ``timeprest
plot``'s default): all that ``--overwrite`` removes. Anything else a user keeps there stays."""
RUN_MARKS = ("method", "model", "dataset")  # with "resolved": a config.json a run wrote


def read_run_config(run_dir: Path, flag: str = "--run-dir") -> dict[str, Any] | None:
    """The ``config.json`` of the run in ``run_dir``, None where there is none; one that no
    timeprest run wrote (no ``resolved`` section, no method, model and dataset) is refused,
    so that no mode ever replaces it. ``flag``: the option that names another directory."""
    f = run_dir / "config.json"
    if not f.exists():
        return None
    old = read_json(f, f"choose another {flag}")
    if not (isinstance(old, dict) and all(k in old for k in ("resolved", *RUN_MARKS))):
        raise ConfigError(
            f"{run_dir} holds a config.json that no timeprest run wrote: choose another {flag}"
        )
    return old


def check_empty_or_run(run_dir: Path, flag: str = "--run-dir") -> None:
    """A directory without a run must be empty (or absent): a new run never writes among
    a user's files, with ``--overwrite`` neither."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(
            f"{run_dir} exists and is not empty, and holds no timeprest run: choose another {flag}"
        )


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Create the run directory, or check that resuming (or replacing) it fits ``cfg``.

    Nothing is deleted here: a run that ``overwrite`` replaces is removed by
    :func:`clear_replaced_run` once the new run has passed its checks.
    """
    run_dir = run_dir_of(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"cannot create run dir {run_dir}: a file of that name exists")
    old = read_run_config(run_dir)
    if old is not None:
        diffs = [k for k in RUN_IDENTITY if old.get(k) != getattr(cfg, k)]
        if resume:
            if diffs:
                k = diffs[0]
                raise ConfigError(
                    f"cannot resume {run_dir}: it was run with {k}={old.get(k)!r}, "
                    f"now {k}={getattr(cfg, k)!r}"
                )
        elif not overwrite:
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
    else:
        check_empty_or_run(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create run dir {run_dir}: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into run dir {run_dir}: permission denied")
    return run_dir


def clear_replaced_run(run_dir: Path) -> None:
    """Remove what a run wrote in ``run_dir`` (:data:`RUN_FILES`, :data:`RUN_FOLDERS`;
    nothing in a new one), right before a new run writes its first file there: a run
    that ``--overwrite`` starts and that fails its checks earlier leaves the old one as
    it was."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        d = run_dir / name
        if d.is_symlink():
            d.unlink()
        elif d.is_dir():
            shutil.rmtree(d)


def environment(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timeprest": __version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": cfg.device,
        "cuda": torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
        "engine": cfg.engine,
    }


def write_run_files(
    run_dir: Path,
    cfg: TrainConfig,
    described: dict[str, Any],
    augment: bool,
    split: dict[str, Any] | None,
    **env: Any,
) -> None:
    """config.json (with what the pipeline resolved: ``described``), env.json and split.json
    (unless ``split`` is None)."""
    resolved = {**cfg.to_dict(), "resolved": dict(described)}
    resolved["resolved"]["num_microbatches"] = cfg.num_microbatches
    resolved["resolved"]["augment"] = augment
    write_json(run_dir / "config.json", resolved)
    write_json(run_dir / "env.json", {**environment(cfg), **env})
    if split is not None:
        write_json(run_dir / "split.json", split)


def saved_split(run_dir: Path, resume: bool) -> list[int] | None:
    """Layer counts of the run being resumed: its checkpoint holds the stages of that split."""
    f = run_dir / "split.json"
    if resume and f.exists():
        return list(read_json(f, "pass --overwrite to start afresh")["layer_counts"])
    return None


@dataclass
class Progress:
    """``checkpoint/progress.json``: how far the checkpoint beside it got."""

    epoch: int
    history: list[EpochRow]
    wall_time: float

    @classmethod
    def read(cls, ckpt_dir: Path) -> Progress:
        f = ckpt_dir / "progress.json"
        if not f.exists():
            raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}")
        data = read_json_object(f, ("epoch", "history", "wall_time"))
        history = [EpochRow.from_dict(h, str(f)) for h in data["history"]]
        return cls(int(data["epoch"]), history, float(data["wall_time"]))

    def write(self, ckpt_dir: Path) -> None:
        write_json(
            ckpt_dir / "progress.json",
            {
                "epoch": self.epoch,
                "history": [h.to_dict() for h in self.history],
                "wall_time": self.wall_time,
            },
        )
