"""Timing layers: the costs of ``balance="time"``.

Each layer runs forward and backward on what the previous layer produced
from a sample micro-batch; the median of a few repeats is its cost. When the
caller gives no sample, :func:`sample_input_for` makes one where the model's
first layer fixes the input shape (a ``Linear``'s ``in_features``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from timeprest.device import sync_device
from timeprest.errors import ConfigError

SAMPLE_ROWS = 32
"""Rows of a derived sample input: a typical micro-batch (timing grows with it, the split little)."""


class LayerTiming(NamedTuple):
    """Median seconds of one layer's forward and of its backward on the sample input."""

    forward: float
    backward: float


def profile_layers(
    layers: Sequence[tuple[str, nn.Module]],
    sample_input: Tensor,
    *,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 5,
) -> list[LayerTiming]:
    """Median seconds of the forward and of the backward of each layer, fed with the previous layer's output.

    Each layer is timed on a deep copy moved to ``device``, so the model keeps
    its gradients, BatchNorm statistics and placement; the global RNG state is
    restored afterwards (dropout draws do not shift the caller's random stream).
    The first layer's input does not require grad, as at stage 0 of a pipeline.
    """
    if warmup < 0 or repeats < 1:
        raise ConfigError(
            f"profiling needs warmup >= 0 and repeats >= 1, got {warmup} and {repeats}"
        )
    dev = torch.device(device)
    rng_devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if dev.type == "cuda"
        else []
    )
    timings: list[LayerTiming] = []
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        x = sample_input.detach().to(dev)
        for i, (name, layer) in enumerate(layers):
            probe = copy.deepcopy(layer).to(dev)
            forward: list[float] = []
            backward: list[float] = []
            out: Any = None
            for _ in range(warmup + repeats):
                inp = x.detach()
                if i > 0 and inp.is_floating_point():
                    inp.requires_grad_(True)
                sync_device(dev)
                t0 = time.perf_counter()
                out = probe(inp)
                if not isinstance(out, Tensor):
                    raise ConfigError(
                        f"layer {name!r} returns {type(out).__name__}; pipeline layers must return one tensor"
                    )
                sync_device(dev)
                t1 = time.perf_counter()
                if out.requires_grad:
                    torch.autograd.backward(out, torch.ones_like(out))
                sync_device(dev)
                forward.append(t1 - t0)
                backward.append(time.perf_counter() - t1)
            timings.append(
                LayerTiming(
                    statistics.median(forward[warmup:]), statistics.median(backward[warmup:])
                )
            )
            x = out.detach()
            del probe
    return timings


def sample_input_for(layers: Sequence[tuple[str, nn.Module]]) -> Tensor:
    """A random micro-batch for the first layer, where its type alone fixes the input shape.

    Only a ``Linear`` does (``SAMPLE_ROWS`` x ``in_features``, in its weight's
    dtype); a convolution does not fix the spatial size, an embedding not the
    sequence length, so anything else asks for ``sample_input``.
    """
    first = layers[0][1]
    while isinstance(first, nn.Sequential) and len(first) > 0:
        first = first[0]
    if not isinstance(first, nn.Linear):
        raise ConfigError(
            "balance='time' needs sample_input (a tensor shaped like one micro-batch of the "
            f"input) here: the first layer, {type(first).__name__}, does not fix the input "
            "shape; or use balance='params' or a list of layer counts"
        )
    # A generator of its own: deriving the sample must not move the caller's random stream.
    gen = torch.Generator().manual_seed(0)
    return torch.randn(SAMPLE_ROWS, first.in_features, generator=gen, dtype=first.weight.dtype)
