"""Checkpoints of a drained pipeline: one format for the emulator and the runtime.

A checkpoint directory holds::

    manifest.json   format, configuration and its hash, number of stages, mini-batch cursor
    stage0.pt       per stage: module state (parameters and buffers), optimizer state,
    stage1.pt       version counter, mini-batch cursor, RNG states
    ...

Everything a resumed run needs to continue bitwise is there: the weights and
the optimizer state, the version counter (the plan counts versions from it),
the cursor (it seeds dropout per micro-batch and tells the caller where the
data stream resumes) and the process's RNG states (for the caller's own
shuffling). Each file is written under a temporary name and renamed into
place; the manifest goes last, and loading checks that every stage file
carries the manifest's cursor, so a crash mid-save is detected instead of
resuming from a mix of two checkpoints. Files load with
``torch.load(weights_only=True)``: no pickled code.

With the distributed engine every rank writes and reads only its own
``stage{r}.pt`` and every rank writes the (identical) manifest, so the
directory may be local to each node.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from timeprest._version import __version__
from timeprest.errors import ConfigError
from timeprest.stage import StageRunner

T = TypeVar("T")
Agreed = Callable[[str, Callable[[], Any]], Any]

FORMAT = "timeprest-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def stage_file(stage: int) -> str:
    return f"stage{stage}.pt"


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- writing ------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def stage_state(runner: StageRunner, minibatches_done: int) -> dict[str, Any]:
    """The contents of ``stage{s}.pt``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stage": runner.index,
        "module": runner.module.state_dict(),
        "optimizer": None if runner.optimizer is None else runner.optimizer.state_dict(),
        "updates": runner.store.latest,
        "remedies": runner.remedies.state_dict(),  # docs/design.md section 12
        "minibatches_done": minibatches_done,
        "rng": rng_state(),
    }


def _check_drained(runners: Sequence[StageRunner], minibatches_done: int) -> None:
    for r in runners:
        # one update per mini-batch at every stage: a train() that failed part-way
        # leaves a stage ahead of the cursor, and such a state cannot be resumed
        if r.store.latest != minibatches_done:
            raise ConfigError(
                f"stage {r.index} has applied {r.store.latest} updates but the pipeline "
                f"completed {minibatches_done} mini-batches (a train() call failed "
                "part-way?): only a drained pipeline can be checkpointed"
            )


def _manifest(config: dict[str, Any], num_stages: int, minibatches_done: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "config_hash": config_hash(config),
        "num_stages": num_stages,
        "minibatches_done": minibatches_done,
        "stages": [stage_file(s) for s in range(num_stages)],
        "timeprest": __version__,
        "torch": torch.__version__,
    }


def _local(what: str, fn: Callable[[], T]) -> T:
    return fn()


def save_checkpoint(
    runners: Sequence[StageRunner],
    minibatches_done: int,
    config: dict[str, Any],
    num_stages: int,
    directory: str | os.PathLike[str],
    *,
    agreed: Agreed = _local,
) -> Path:
    """Write the stage files of ``runners`` (the stages this process runs), then the manifest.

    ``config`` is what a loading pipeline must match; ``agreed(what, fn)`` runs a step
    so that a failure in any process fails every process (the engine's; by default
    the step just runs).
    """
    d = Path(directory)

    def write_stages() -> None:
        _check_drained(runners, minibatches_done)
        d.mkdir(parents=True, exist_ok=True)
        for r in runners:
            state = stage_state(r, minibatches_done)
            atomic_write(d / stage_file(r.index), lambda f, st=state: torch.save(st, f))

    def write_manifest() -> None:
        manifest = _manifest(config, num_stages, minibatches_done)
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        atomic_write(d / MANIFEST, lambda f: f.write(text.encode()))

    # the manifest must not name files that another process failed to write
    agreed("saving the checkpoint", write_stages)
    agreed("writing the checkpoint manifest", write_manifest)
    return d


# -- reading ------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ConfigError(f"no checkpoint in {directory}: {MANIFEST} is missing")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path} is not a {FORMAT} version {FORMAT_VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r})"
        )
    return manifest


def read_stage_file(path: Path, stage: int, cursor: object, map_location: Any) -> dict[str, Any]:
    """Stage ``stage``'s file of a checkpoint whose manifest says ``cursor`` mini-batches;
    an unreadable or mismatched file is one ConfigError line."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling fails in many ways, each with its own type
        lines = str(exc).strip().splitlines()
        why = lines[0] if lines else type(exc).__name__
        raise ConfigError(f"{path} is unreadable (corrupt or cut short?): {why}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not a timeprest stage file")
    if state.get("stage") != stage:
        raise ConfigError(
            f"{path} holds stage {state.get('stage')!r}, not stage {stage}: the checkpoint's "
            "stage files were mixed up"
        )
    if state.get("minibatches_done") != cursor:
        raise ConfigError(
            f"{path} is from mini-batch {state.get('minibatches_done')} but the manifest says "
            f"{cursor}: the checkpoint was cut off while being written; use an older one"
        )
    return state


def _check_config(config: dict[str, Any], manifest: dict[str, Any], directory: Path) -> None:
    if manifest["config_hash"] == config_hash(config):
        return
    saved = manifest["config"]
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, pipeline {config.get(k)!r}"
        for k in sorted(set(saved) | set(config))
        if saved.get(k) != config.get(k)
    ]
    raise ConfigError(
        f"the checkpoint in {directory} was written by a different configuration: "
        + ("; ".join(diffs) or "hash differs")
    )


def _apply(runner: StageRunner, state: dict[str, Any], path: Path) -> None:
    try:
        runner.module.load_state_dict(state["module"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path} does not fit stage {runner.index}'s module: {first}") from exc
    opt_state = state["optimizer"]
    if (opt_state is None) != (runner.optimizer is None):
        raise ConfigError(
            f"{path}: the checkpoint and stage {runner.index} disagree on whether "
            "the stage has trainable parameters"
        )
    if runner.optimizer is not None:
        try:
            runner.optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as exc:
            raise ConfigError(
                f"{path}: the optimizer state does not fit stage {runner.index}'s optimizer "
                f"(a different optimizer?): {exc}"
            ) from exc
    runner.remedies.load_state_dict(state.get("remedies") or {})
    runner.store.latest = int(state["updates"])
    runner.store.reset_peaks()


def load_checkpoint(
    runners: Sequence[StageRunner],
    config: dict[str, Any],
    num_stages: int,
    directory: str | os.PathLike[str],
    *,
    agreed: Agreed = _local,
) -> int:
    """Restore ``runners`` (the stages this process runs) from ``directory``; the cursor.

    The cursor is the number of mini-batches the checkpointed pipeline had trained.
    """
    d = Path(directory)

    def load() -> int:
        manifest = read_manifest(d)
        _check_config(config, manifest, d)
        if manifest["num_stages"] != num_stages:
            raise ConfigError(
                f"the checkpoint has {manifest['num_stages']} stages, the pipeline {num_stages}"
            )
        cursor = int(manifest["minibatches_done"])
        states = []
        for r in runners:
            path = d / stage_file(r.index)
            if not path.exists():
                raise ConfigError(f"checkpoint {d} has no file for stage {r.index} ({path.name})")
            state = read_stage_file(path, r.index, cursor, r.device)
            states.append((r, state, path))
        for r, state, path in states:
            _apply(r, state, path)
        if states:
            set_rng_state(states[0][1]["rng"])
        return cursor

    result: int = agreed("loading the checkpoint", load)
    return result
