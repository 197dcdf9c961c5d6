"""What a task is: how its data are loaded and batched, its loss and its held-out metrics.

The training loop (:mod:`timeprest.train.loop`) is written once; a
:class:`Task` says what differs between image classification and causal
language modelling (docs/design.md section 13). The data of a run exist only
on the processes that read them; :class:`DataInfo` is what every process is
told of them (it is broadcast).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

Minibatch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DataInfo:
    """What every process knows of the run's data, whether or not it reads them."""

    task: str
    """``classification`` or ``lm``."""
    in_channels: int
    num_classes: int
    """Classes, or the vocabulary size of a language model."""
    image_size: int
    augment: bool
    train_rows: int
    """Rows (images, or windows of block_size + 1 tokens) per training epoch."""
    test_rows: int
    description: str
    """How the log line describes the data."""


@dataclass(frozen=True)
class Metrics:
    """Held-out figures of the whole model with the latest weights.

    ``loss`` is the mean cross-entropy in nats (per image, or per token);
    ``accuracy`` the fraction of images (or next tokens) predicted right.
    ``bits_per_byte`` and ``perplexity`` are set for byte-level language models.
    """

    loss: float
    accuracy: float
    bits_per_byte: float | None = None
    perplexity: float | None = None


class Task(Protocol):
    """One kind of workload, bound to a run's configuration (see :func:`timeprest.tasks.task_for`)."""

    name: str

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean loss of a micro-batch."""
        ...

    def load(self) -> tuple[Any, Any, DataInfo]:
        """The training and held-out data of the run, and what to tell every process."""
        ...

    def model_options(self) -> dict[str, int | float | bool]:
        """The options ``build_model`` gets for this task's model."""
        ...

    def train_batches(self, train: Any, info: DataInfo, epoch: int) -> Sequence[Minibatch]:
        """The mini-batches of one epoch, built lazily, deterministic from (seed, epoch)."""
        ...

    def sample_input(self, train: Any, rows: int) -> Tensor:
        """``rows`` rows of input, to time the layers for the split."""
        ...

    def evaluate(self, model: nn.Module, test: Any, batch_size: int, device: str) -> Metrics:
        """The held-out metrics of ``model`` (the composed stages)."""
        ...


@torch.no_grad()
def sum_over_batches(
    model: nn.Module,
    batches: Iterable[Minibatch],
    device: str,
    count: Callable[[Tensor, Tensor], tuple[float, int, int]],
) -> tuple[float, int, int]:
    """``count(output, target)`` = (summed loss, right, items), summed over ``batches``.

    The model runs in eval mode (no dropout, BatchNorm's running statistics) and
    each submodule's training flag is restored after.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    total, right, items = 0.0, 0, 0
    try:
        for x, y in batches:
            loss, r, n = count(model(x.to(device)), y.to(device))
            total, right, items = total + loss, right + r, items + n
    finally:
        for m, flag in flags:
            m.train(flag)
    return total, right, items


def nats_to_bits(nats: float) -> float:
    """Nats per byte token to bits per byte."""
    return nats / math.log(2)
