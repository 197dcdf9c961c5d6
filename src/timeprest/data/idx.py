"""Reader for the IDX files of MNIST and Fashion-MNIST (gzip-compressed or not).

IDX layout: two zero bytes, a type byte (0x08 = unsigned byte), the number of
dimensions, then one big-endian uint32 per dimension, then the values in
row-major order. Images are ``idx3`` (N x rows x cols), labels ``idx1`` (N).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from timeprest.errors import DataError

# The four files of a split, by role. Each may also be found uncompressed
# (without ".gz") or, as some mirrors name them, with a dot before "idx".
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


def candidates(filename: str) -> list[str]:
    """Names a file may carry on disk: ``x-idx3-ubyte.gz``, ``x-idx3-ubyte``, ``x.idx3-ubyte``."""
    plain = filename.removesuffix(".gz")
    dotted = plain.replace("-idx", ".idx")
    return [filename, plain, dotted, dotted + ".gz"]


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` by role, or None when any is missing."""
    found: dict[str, Path] = {}
    for role, filename in IDX_FILES.items():
        for name in candidates(filename):
            path = directory / name
            if path.is_file():
                found[role] = path
                break
        else:
            return None
    return found


def read_idx(path: Path, ndim: int) -> Tensor:
    """The uint8 tensor stored in one IDX file, checked against its header.

    Raises DataError naming the file when it is not a readable IDX file with
    ``ndim`` dimensions of unsigned bytes whose size matches its header.
    """
    try:
        raw = path.read_bytes()
        # Decide by content, not by extension: some tools decompress and keep ".gz".
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}; delete it and fetch it again") from e
    if len(raw) < 4 + 4 * ndim:
        raise DataError(
            f"{path} is too short for an IDX header ({len(raw)} bytes); delete it and fetch it again"
        )
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        magic = int.from_bytes(raw[:4], "big")
        expected = (_UBYTE << 8) | ndim
        raise DataError(
            f"{path} has IDX magic number 0x{magic:08x}, expected 0x{expected:08x} "
            f"(unsigned bytes, {ndim} dimensions); is it the right file?"
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = 1
    for d in shape:
        count *= d
    payload = len(raw) - 4 - 4 * ndim
    if payload != count:
        raise DataError(
            f"{path}: header says shape {shape} ({count} bytes of data) but the file holds "
            f"{payload}; the file is truncated or corrupt, delete it and fetch it again"
        )
    # bytearray: torch.frombuffer wants a writable buffer to avoid a warning.
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(shape)


def load_idx_split(
    files: dict[str, Path], num_classes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train images, train labels, test images, test labels (uint8 images N x H x W, int64 labels)."""
    out: list[Tensor] = []
    for part in ("train", "test"):
        images = read_idx(files[f"{part}_images"], 3)
        labels = read_idx(files[f"{part}_labels"], 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{files[f'{part}_images']} holds {images.shape[0]} images but "
                f"{files[f'{part}_labels']} holds {labels.shape[0]} labels"
            )
        if labels.numel() and int(labels.max()) >= num_classes:
            raise DataError(
                f"{files[f'{part}_labels']} has label {int(labels.max())}, expected < {num_classes}"
            )
        out += [images, labels.long()]
    return out[0], out[1], out[2], out[3]
