"""Mini-batches of an in-memory dataset: deterministic order and augmentation.

Every random choice is drawn from a ``torch.Generator`` seeded from
``(seed, epoch)`` (the order) or ``(seed, epoch, batch index)`` (the
augmentation of one batch), never from the global RNG. So the batches of an
epoch are the same in every process that asks for them, in any order, and
indexing a batch twice gives the same tensors: what the emulator and the
multi-process runtime need to see identical data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

from timeprest.data.dataset import Dataset
from timeprest.errors import ConfigError

CROP_PADDING = 4


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers, stable across platforms and Python versions.

    (``hash()`` is salted per process, and ``seed * K + epoch`` makes
    neighbouring seeds share streams.)
    """
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def augment_batch(x: Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> Tensor:
    """Random crop with zero padding, then random horizontal flip, per image of ``N x C x H x W``.

    The data are normalised, so zero padding is the dataset's mean colour
    (torchvision pads before normalising, with black: a negligible difference).
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding))
    # One gather for the whole batch: image i takes rows oy_i .. oy_i + h - 1
    # and columns ox_i .. ox_i + w - 1 of its padded copy.
    rows = offsets[:, 0:1] + torch.arange(h)  # n x h
    cols = offsets[:, 1:2] + torch.arange(w)  # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def num_batches(rows: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Mini-batches in an epoch of ``rows`` rows: the one count of steps per epoch."""
    return rows // batch_size if drop_last else -(-rows // batch_size)


def subset(dataset: Dataset, limit: int, *, seed: int, part: str) -> Dataset:
    """``limit`` rows drawn at random from ``(seed, part)``; the whole set when it is smaller.

    Not the first rows: an image folder is sorted by class, and its first rows
    hold only the first classes. The draw depends only on the seed, the part
    (``train`` or ``test``) and the set's size, so every run with that seed
    trains and tests on the same rows. The rows keep their dataset order.
    """
    if limit < 1:
        raise ConfigError(f"a row limit must be >= 1, got {limit}")
    n = len(dataset)
    if limit >= n:
        return dataset
    g = torch.Generator().manual_seed(derive_seed("limit", part, seed))
    rows = torch.randperm(n, generator=g)[:limit].sort().values
    return Dataset(dataset.x[rows], dataset.y[rows])


class IndexedBatches(Sequence[tuple[Tensor, Tensor]]):
    """Mini-batches built when indexed: subclasses set ``_len`` and define ``_batch(i)``."""

    _len: int

    def _batch(self, i: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[Tensor, Tensor]]: ...

    def __getitem__(
        self, i: int | slice
    ) -> tuple[Tensor, Tensor] | Sequence[tuple[Tensor, Tensor]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"batch {i} out of range for {self._len} batches")
        return self._batch(i)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(self._len):
            yield self[i]


class Batches(IndexedBatches):
    """The mini-batches of one epoch, built on demand; ``len()`` and indexing work."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        augment: bool,
        drop_last: bool,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        n = len(dataset)
        if drop_last and n < batch_size:
            raise ConfigError(
                f"drop_last with batch_size {batch_size} leaves no batch of a {n}-row dataset; "
                f"use a batch_size <= {n} or drop_last=False"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.augment = augment
        if shuffle:
            g = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
            self.order: Tensor | None = torch.randperm(n, generator=g)
        else:
            self.order = None
        self._len = num_batches(n, batch_size, drop_last=drop_last)

    def _batch(self, i: int) -> tuple[Tensor, Tensor]:
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, len(self.dataset))
        if self.order is None:
            x, y = self.dataset.x[lo:hi], self.dataset.y[lo:hi]
        else:
            rows = self.order[lo:hi]
            x, y = self.dataset.x[rows], self.dataset.y[rows]
        if self.augment:
            g = torch.Generator().manual_seed(derive_seed("augment", self.seed, self.epoch, i))
            x = augment_batch(x, g)
        return x, y


def make_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    augment: bool = False,
    drop_last: bool = False,
) -> Batches:
    """The mini-batches ``(x, y)`` of one epoch of ``dataset``.

    The order is a permutation drawn from ``(seed, epoch)`` when ``shuffle``
    (dataset order otherwise); ``augment`` applies random crop (padding 4) and
    horizontal flip, drawn from ``(seed, epoch, batch index)``. The last batch
    is smaller when ``batch_size`` does not divide the dataset, unless
    ``drop_last``. Batches are built when indexed, so an epoch costs no memory
    up front; x is a new tensor (a view for unshuffled, unaugmented data).
    """
    return Batches(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        augment=augment,
        drop_last=drop_last,
    )
