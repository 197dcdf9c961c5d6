"""Mixed precision: autocast around a stage's forward, float32 weights and optimizer state.

docs/design.md section 11. ``bf16`` runs the forward under ``torch.autocast``
with bfloat16 on the stage's device (CPU or CUDA); ``fp16`` with float16, on
CUDA only, and refused for now: it needs a loss scale that every stage
agrees to skip a step with, which is not built yet. The
leaves the forward reads stay float32, so gradients, master weights and the
optimizer state are float32. Autocast saves for the backward the *cast* of a
weight, a tensor whose storage is not the weight's; the weight tokens of
:mod:`timeprest.stage.weights` recognise such casts and, at the backward,
cast the policy's backward weights instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from timeprest.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """ConfigError for an unknown precision, or fp16 off CUDA."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision fp16 needs a CUDA device (a stage is on {device.type}); use bf16 on the CPU"
        )
    if precision == "fp16":
        raise ConfigError(
            "precision fp16 needs loss scaling across stages, which timeprest does not do yet; "
            "use bf16 (same speed on recent GPUs, no scaling needed)"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast region of a forward at ``precision`` (a no-op for fp32)."""
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
