"""Mixed precision: autocast around a stage's forward, float32 weights and optimizer state.

docs/design.md section 11. ``bf16`` runs the forward under ``torch.autocast``
with bfloat16 on the stage's device (CPU or CUDA); ``fp16`` with float16,
with a *static* loss scale S (a power of two, default 1024): the last stage
multiplies its loss by S before the backward, the activation gradients
between stages stay scaled (so they do not underflow), and each stage divides
its weight gradients by S as they arrive (exact) and stops with a
:class:`~timeprest.errors.NonFiniteLossError` on an overflow. A dynamic
scale that skips steps would need every stage to agree on the skip of each
mini-batch, which asynchronous schedules do not allow. The
leaves the forward reads stay float32, so gradients, master weights and the
optimizer state are float32. Autocast saves for the backward the *cast* of a
weight, a tensor whose storage is not the weight's; the weight tokens of
:mod:`timeprest.stage.weights` recognise such casts and, at the backward,
cast the policy's backward weights instead.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from timeprest.errors import ConfigError, NonFiniteLossError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


DEFAULT_LOSS_SCALE = 1024.0


def check_precision(precision: str, device: torch.device) -> None:
    """ConfigError for an unknown precision."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def check_loss_scale(precision: str, loss_scale: float | None) -> float:
    """The loss scale to use: fp16's (a power of two >= 1, default 1024), 1 otherwise."""
    if loss_scale is None:
        return DEFAULT_LOSS_SCALE if precision == "fp16" else 1.0
    if precision != "fp16":
        raise ConfigError(f"a loss scale is for precision fp16, not {precision}")
    if not (isinstance(loss_scale, (int, float)) and loss_scale >= 1 and math.isfinite(loss_scale)):
        raise ConfigError(f"the loss scale must be a finite number >= 1, got {loss_scale!r}")
    if math.frexp(loss_scale)[0] != 0.5:
        raise ConfigError(
            f"the loss scale must be a power of two (scaling is then exact), got {loss_scale!r}"
        )
    return float(loss_scale)


def unscale(
    grads: list[Tensor | None], scale: float, stage: int, minibatch: int
) -> list[Tensor | None]:
    """Weight gradients divided by the loss scale; an overflow is a NonFiniteLossError."""
    out = [None if g is None else g / scale for g in grads]
    if not all(g is None or bool(torch.isfinite(g).all()) for g in out):
        raise NonFiniteLossError(
            f"fp16 gradients overflowed at stage {stage}, mini-batch {minibatch} with loss "
            f"scale {scale:g}: lower the loss scale (--loss-scale) or use bf16"
        )
    return out


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast region of a forward at ``precision`` (a no-op for fp32)."""
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
