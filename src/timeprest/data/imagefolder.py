"""Images in class folders: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

Every image is converted to RGB and resized to ``image_size x image_size``;
classes are the folder names of ``train`` sorted by name, and label ``i`` is
the ``i``-th of them. Pillow is needed (imported only here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from timeprest.errors import DataError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(
            "the imagefolder dataset reads images with Pillow: pip install pillow"
        ) from e
    return Image


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(
        (d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _read_images(files: list[Path], image_size: int) -> Tensor:
    image_mod = _pillow()
    # Pillow >= 9.1 has the Resampling enum; older versions only the module constant.
    bilinear = getattr(image_mod, "Resampling", image_mod).BILINEAR
    out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, path in enumerate(files):
        try:
            with image_mod.open(path) as img:
                rgb = img.convert("RGB").resize((image_size, image_size), bilinear)
                data = rgb.tobytes()
        except (OSError, ValueError, SyntaxError) as e:  # Pillow raises all three on bad files
            raise DataError(f"cannot read image {path}: {e}; delete or replace it") from e
        pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out[i] = pixels.reshape(image_size, image_size, 3).permute(2, 0, 1)
    return out


def load_image_folder(
    root: Path, image_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...]]:
    """Train images, train labels, test images, test labels (uint8 N x 3 x S x S, int64) and class names."""
    if not root.is_dir():
        raise DataError(
            f"imagefolder: {root} is not a directory; expected {root}/train/<class>/* and {root}/test/<class>/*"
        )
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(
                f"imagefolder: {root / part} is missing; expected {root}/{part}/<class>/<image files>"
            )
    train_dirs = _class_dirs(root / "train")
    if not train_dirs:
        raise DataError(
            f"imagefolder: {root / 'train'} has no class folders; expected {root}/train/<class>/<image files>"
        )
    classes = tuple(d.name for d in train_dirs)
    index = {name: i for i, name in enumerate(classes)}
    parts: list[Tensor] = []
    for part in ("train", "test"):
        files: list[Path] = []
        labels: list[int] = []
        for d in _class_dirs(root / part):
            if d.name not in index:
                raise DataError(
                    f"imagefolder: class folder {d} has no counterpart in {root / 'train'} "
                    f"(train classes: {', '.join(classes)})"
                )
            images = _image_files(d)
            if part == "train" and not images:
                raise DataError(
                    f"imagefolder: {d} holds no images (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files += images
            labels += [index[d.name]] * len(images)
        if not files:
            raise DataError(f"imagefolder: {root / part} holds no images in its class folders")
        parts += [_read_images(files, image_size), torch.tensor(labels, dtype=torch.int64)]
    return parts[0], parts[1], parts[2], parts[3], classes
