"""In-memory datasets: a train and a test set of normalised image tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from timeprest.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset, held in memory.

    ``x`` is float32 ``N x C x H x W``, already normalised with the dataset's
    per-channel mean and std; ``y`` is int64 ``N`` with labels in
    ``[0, num_classes)``.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise DataError(f"images must be N x C x H x W, got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(
                f"labels must be a vector with one label per image "
                f"(images: {self.x.shape[0]}, labels shape: {tuple(self.y.shape)})"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class DatasetPair:
    """The train and test sets of one dataset, with what a model needs to know."""

    name: str
    """Name as given to ``load_dataset`` (``imagefolder:PATH`` keeps its path)."""
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    """Height and width of every image (images are square)."""
    mean: tuple[float, ...]
    """Per-channel mean subtracted from the [0, 1] pixels (or from the raw values for synthetic)."""
    std: tuple[float, ...]
    """Per-channel std the centred pixels were divided by."""
    classes: tuple[str, ...]
    """Class names, index = label."""
    augment_default: bool
    """True for natural colour images (CIFAR-like) where crop+flip augmentation is the usual choice."""
    source: str
    """Where the data came from: a directory, or ``generated``."""

    def __post_init__(self) -> None:
        for part, ds in (("train", self.train), ("test", self.test)):
            c, h, w = ds.x.shape[1:]
            if (c, h, w) != (self.in_channels, self.image_size, self.image_size):
                raise DataError(
                    f"{self.name}: {part} images are {c}x{h}x{w}, expected "
                    f"{self.in_channels}x{self.image_size}x{self.image_size}"
                )
            if len(ds) and (int(ds.y.min()) < 0 or int(ds.y.max()) >= self.num_classes):
                raise DataError(
                    f"{self.name}: {part} labels span [{int(ds.y.min())}, {int(ds.y.max())}], "
                    f"expected [0, {self.num_classes - 1}]"
                )
        if len(self.classes) != self.num_classes:
            raise DataError(
                f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes"
            )


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x - mean) / std`` per channel, in place on a float tensor ``N x C x H x W``."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``N x C x H x W`` (float64 sums, so large sets stay exact)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = flat.mean(dim=1)
    std = flat.std(dim=1).clamp_min(1e-6)  # a constant channel must not divide by zero
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resize(x: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Bilinear resize (antialiased when shrinking) of float ``N x C x H x W`` to ``size x size``.

    Done in chunks so a 60 000-image set does not need a second full copy at
    the intermediate precision.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=x.dtype)
    shrink = size < max(x.shape[-2], x.shape[-1])
    for i in range(0, x.shape[0], chunk):
        out[i : i + chunk] = torch.nn.functional.interpolate(
            x[i : i + chunk],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )
    return out
