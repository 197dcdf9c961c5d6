"""The trained model back out: one ``state_dict`` of the unsplit model, keyed as the user's model.

A pipeline trains stages, each an ``nn.Sequential`` of the model's own layer
modules, so stage ``s``'s key ``"{layer}.{rest}"`` is the model's key
``"{path}.{rest}"``, where ``path`` is where that layer sits in the model.
The split records those paths and the model's own keys
(:meth:`SplitPlan.to_dict`: ``stages``, ``layer_paths``, ``model_keys``), so:

- :func:`merge_stage_state_dicts` turns in-memory stages' state dicts and
  their plan into the model's ``state_dict`` (``model.load_state_dict(sd)``
  then loads it strictly);
- :func:`export_state_dict` does the same from a run directory of
  ``timeprest train`` (its ``checkpoint/`` and ``split.json``);
- :func:`save_state_dict` writes it as ``.pt`` (``torch.save``) or
  ``.safetensors``, atomically; ``timeprest export`` is the command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from timeprest.checkpoint import MANIFEST, atomic_write, read_manifest, read_stage_file, stage_file
from timeprest.errors import ConfigError
from timeprest.splitting.layers import join_key
from timeprest.splitting.partition import SplitPlan

Format = Literal["pt", "safetensors"]
FORMATS: tuple[Format, ...] = ("pt", "safetensors")
SPLIT_FILE = "split.json"
CHECKPOINT_DIR = "checkpoint"


def merge_stage_state_dicts(
    plan: SplitPlan | Mapping[str, Any], stage_state_dicts: Sequence[Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """The unsplit model's ``state_dict`` from its stages' (``[stage.state_dict() ...]``).

    ``plan`` is the :class:`SplitPlan` the stages were built from, or its
    ``to_dict()`` (a run's ``split.json``). The result has exactly the keys
    of the model's ``state_dict()``, in its order, holding the stages'
    tensors (not copies); anything that does not map back is a ConfigError.
    """
    info = plan.to_dict() if isinstance(plan, SplitPlan) else plan
    names: list[list[str]] = info.get("stages") or []
    paths: list[list[str | None]] = info.get("layer_paths") or []
    model_keys: list[str] = info.get("model_keys") or []
    if not paths or not model_keys:
        raise ConfigError(
            "the split does not record where its layers sit in the model (no layer_paths or "
            "model_keys: written by an older timeprest?); split the model again to export it"
        )
    if len(stage_state_dicts) != len(names):
        raise ConfigError(
            f"the split has {len(names)} stages but {len(stage_state_dicts)} stage state dicts "
            "were given; give one per stage, in order"
        )
    merged: dict[str, Tensor] = {}
    for s, state in enumerate(stage_state_dicts):
        where = dict(zip(names[s], paths[s]))
        for key, tensor in state.items():
            layer, _, rest = key.partition(".")
            if layer not in where:
                raise ConfigError(
                    f"stage {s}'s key {key!r} belongs to none of its layers ({', '.join(names[s])})"
                    ": the stages and the split do not match"
                )
            path = where[layer]
            if path is None:
                raise ConfigError(
                    f"layer {layer!r} of stage {s} is not a module of the model (a "
                    "pipeline_layers() hook that returns new modules?), so its keys cannot be "
                    "named as the model's; return the model's own submodules from the hook"
                )
            model_key = join_key(path, rest)
            # one module used by two layers of a stage appears twice with one value
            if model_key in merged and not torch.equal(merged[model_key], tensor):
                raise ConfigError(
                    f"two stage tensors map to the model key {model_key!r} with different "
                    "values: the stages and the split do not match"
                )
            merged[model_key] = tensor
    missing = [k for k in model_keys if k not in merged]
    extra = sorted(set(merged) - set(model_keys))
    if missing or extra:
        raise ConfigError(
            "the stages do not give back the model's state: "
            + "; ".join(
                f"{what} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing", missing), ("unexpected", extra))
                if keys
            )
        )
    return {k: merged[k] for k in model_keys}


def export_state_dict(run_dir: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The unsplit model's ``state_dict`` (on the CPU) from a run of ``timeprest train``.

    ``run_dir`` is the run directory (holding ``checkpoint/`` and
    ``split.json``) or its ``checkpoint/`` directory itself. The weights are
    the latest checkpoint's: the end of the last completed epoch.
    """
    checkpoint, split_path = _locate(Path(run_dir))
    try:
        split_info = json.loads(split_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {split_path}: {exc}") from exc
    manifest = read_manifest(checkpoint)
    num_stages = int(manifest["num_stages"])
    if num_stages != len(split_info.get("layer_counts", [])):
        raise ConfigError(
            f"the checkpoint in {checkpoint} has {num_stages} stages but {split_path} "
            f"{len(split_info.get('layer_counts', []))}: they are from different runs"
        )
    cursor = manifest["minibatches_done"]
    states = [_stage_module_state(checkpoint, s, cursor) for s in range(num_stages)]
    return merge_stage_state_dicts(split_info, states)


def save_state_dict(
    state: Mapping[str, Tensor],
    out: str | os.PathLike[str],
    *,
    format: Format | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state`` to ``out`` as ``pt`` or ``safetensors`` (default: by the file's suffix).

    The file is written under a temporary name and renamed into place, so a
    crash never leaves half a file under ``out``.
    """
    path = Path(out)
    fmt = format or ("safetensors" if path.suffix == ".safetensors" else "pt")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name such as {path / 'model.pt'}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    if fmt == "safetensors":
        try:
            import safetensors.torch
        except ImportError:
            raise ConfigError(
                "the safetensors format needs the safetensors package: pip install safetensors"
            ) from None
        data = safetensors.torch.save(_unshared(state))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(dict(state), f))
    return path


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: Format | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Tensor]]:
    """:func:`export_state_dict` then :func:`save_state_dict`; the file and what it holds."""
    state = export_state_dict(run_dir)
    return save_state_dict(state, out, format=format, overwrite=overwrite), state


def _locate(path: Path) -> tuple[Path, Path]:
    """The checkpoint directory and the split file of a run (or of its checkpoint directory)."""
    if not path.is_dir():
        raise ConfigError(f"no run directory at {path}")
    if (path / MANIFEST).exists():
        checkpoint = path
        run = path.parent
    else:
        checkpoint = path / CHECKPOINT_DIR
        run = path
        if not (checkpoint / MANIFEST).exists():
            raise ConfigError(
                f"{path} holds no checkpoint ({CHECKPOINT_DIR}/{MANIFEST} is missing): export "
                "reads the one timeprest train writes after each epoch"
            )
    split_path = run / SPLIT_FILE
    if not split_path.exists():
        raise ConfigError(
            f"{split_path} is missing: export needs the run's {SPLIT_FILE} to name the stages' "
            "keys as the model's"
        )
    return checkpoint, split_path


def _stage_module_state(checkpoint: Path, stage: int, cursor: Any) -> dict[str, Tensor]:
    path = checkpoint / stage_file(stage)
    if not path.exists():
        raise ConfigError(
            f"checkpoint {checkpoint} has no {path.name} (a distributed run on several nodes "
            "keeps each stage's file on its node: gather them into one directory)"
        )
    state = read_stage_file(path, stage, cursor, "cpu")
    module: dict[str, Tensor] = state["module"]
    return module


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors stores each apart)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        t = tensor.detach()
        ptr = t.untyped_storage().data_ptr()
        alone = ptr not in seen and t.is_contiguous()
        out[key] = t if alone else t.clone(memory_format=torch.contiguous_format)
        if t.numel() > 0:
            seen.add(ptr)
    return out
