"""``load_dataset``: one entry point for every dataset the tools know."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from timeprest.data.cifar import find_cifar_dir, load_cifar_split
from timeprest.data.dataset import Dataset, DatasetPair, channel_stats, normalise, resize
from timeprest.data.download import locate
from timeprest.data.idx import find_idx_files, load_idx_split
from timeprest.data.imagefolder import load_image_folder
from timeprest.data.synthetic import make_synthetic, parse_synthetic
from timeprest.errors import ConfigError

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder:PATH", "synthetic")
DEFAULT_DATASET = "fashion-mnist"

# Per-channel mean and std of the training pixels scaled to [0, 1], the
# values used throughout the literature for these datasets.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def load_dataset(
    name: str = DEFAULT_DATASET,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    download: bool = True,
    seed: int = 0,
) -> DatasetPair:
    """Load the train and test sets of ``name`` into memory, normalised.

    Names: ``fashion-mnist``, ``mnist`` (IDX files), ``cifar10``, ``cifar100``
    (python pickle batches), ``imagefolder:PATH`` (``PATH/train/<class>/*``,
    ``PATH/test/<class>/*``), ``synthetic`` (generated from ``seed``; options
    as ``synthetic:train=2048,test=512,classes=10,channels=1,noise=1.0``).

    Files are looked for in ``data_dir``, ``$TIMEPREST_DATA``, system dataset
    directories and ``~/.cache/timeprest/<name>``, in that order (see
    ``timeprest.data.download``); when absent and ``download`` is true they are
    fetched from the official source into the cache. ``image_size`` resizes
    the images (bilinear) to that square size; by default they keep their
    native size (28 for MNIST-like, 32 for CIFAR, 32 for image folders, 28 for
    synthetic). ``seed`` only matters for ``synthetic``.
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    kind, sep, arg = name.partition(":")
    if kind in ("fashion-mnist", "mnist") and not sep:
        files, where = locate(kind, data_dir, find_idx_files, download)
        x_tr, y_tr, x_te, y_te = load_idx_split(files, num_classes=10)
        classes = FASHION_CLASSES if kind == "fashion-mnist" else tuple(str(i) for i in range(10))
        images = (x_tr.unsqueeze(1), y_tr, x_te.unsqueeze(1), y_te)
        return _finish(name, images, STATS[kind], classes, image_size, False, str(where))
    if kind in ("cifar10", "cifar100") and not sep:
        folder, _ = locate(kind, data_dir, lambda d: find_cifar_dir(d, kind), download)
        *cifar, classes = load_cifar_split(folder, kind)
        return _finish(name, tuple(cifar), STATS[kind], classes, image_size, True, str(folder))
    if kind == "imagefolder":
        if not arg:
            raise ConfigError(
                "imagefolder needs a path: imagefolder:PATH with PATH/train/<class>/* and PATH/test/<class>/*"
            )
        root = Path(arg).expanduser()
        size = 32 if image_size is None else image_size
        *user_images, classes = load_image_folder(root, size)
        # No published statistics for a user's folder: use its training set's.
        stats = channel_stats(user_images[0].float().div_(255))
        return _finish(name, tuple(user_images), stats, classes, None, True, str(root))
    if kind == "synthetic":
        spec = parse_synthetic(arg, image_size)
        xf_tr, y_tr, xf_te, y_te = make_synthetic(spec, seed)
        mean, std = channel_stats(xf_tr)
        train = Dataset(normalise(xf_tr, mean, std), y_tr)
        test = Dataset(normalise(xf_te, mean, std), y_te)
        return DatasetPair(
            name=name,
            train=train,
            test=test,
            num_classes=spec.num_classes,
            in_channels=spec.in_channels,
            image_size=spec.image_size,
            mean=mean,
            std=std,
            classes=tuple(f"class{i}" for i in range(spec.num_classes)),
            augment_default=False,
            source="generated",
        )
    raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def _finish(
    name: str,
    images: tuple[Tensor, ...],
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    classes: tuple[str, ...],
    image_size: int | None,
    augment_default: bool,
    source: str,
) -> DatasetPair:
    """uint8 images (train x, y, test x, y) to normalised float32 at ``image_size``, with
    their metadata."""
    x_tr, y_tr, x_te, y_te = images
    mean, std = stats

    def prepare(x: Tensor) -> Tensor:
        xf = x.to(torch.float32).div_(255)
        if image_size is not None:
            xf = resize(xf, image_size)
        return normalise(xf, mean, std)

    train, test = Dataset(prepare(x_tr), y_tr), Dataset(prepare(x_te), y_te)
    return DatasetPair(
        name=name,
        train=train,
        test=test,
        num_classes=len(classes),
        in_channels=train.x.shape[1],
        image_size=train.x.shape[-1],
        mean=mean,
        std=std,
        classes=classes,
        augment_default=augment_default,
        source=source,
    )
