"""Reader for CIFAR-10 and CIFAR-100 in their "python version" pickle layout.

``cifar-10-batches-py/data_batch_1..5, test_batch`` and
``cifar-100-python/train, test``: each a pickled dict with ``data`` (a numpy
uint8 array N x 3072, the red, green and blue 32 x 32 planes one after the
other) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from timeprest.errors import DataError

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Pickle can run arbitrary code; the CIFAR files only need these numpy pieces
# to rebuild their arrays, so nothing else is allowed in. (_codecs.encode is how
# Python 3 writes bytes at pickle protocol 2, for files re-pickled since.)
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # numpy 2 moved numpy.core to numpy._core; the old path still works but warns.
        try:
            mod = importlib.import_module(module.replace("numpy.core", "numpy._core"))
        except ImportError:
            mod = importlib.import_module(module)
        return getattr(mod, name)


def find_cifar_dir(directory: Path, name: str) -> Path | None:
    """The folder holding the batch files: ``directory/<layout folder>`` or ``directory`` itself."""
    folder, train, test = CIFAR_LAYOUT[name]
    for d in (directory / folder, directory):
        if all((d / f).is_file() for f in train + test):
            return d
    return None


def _read_batch(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    try:
        import numpy as np
    except ImportError as e:
        raise DataError(
            f"reading {path} needs numpy (the CIFAR files are numpy pickles): pip install numpy"
        ) from e
    try:
        with path.open("rb") as f:
            # The files were written by Python 2: keys and strings come back as bytes.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise DataError(
            f"cannot read {path} as a CIFAR batch ({e}); delete it and fetch it again"
        ) from e
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch (a pickled dict), got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(
            f"{path} lacks 'data' or '{label_key}' (keys: {sorted(map(str, batch))}); "
            f"is it a {'CIFAR-100' if label_key == 'fine_labels' else 'CIFAR-10'} file?"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    x = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_cifar_split(
    directory: Path, name: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...]]:
    """Train images, train labels, test images, test labels (uint8 N x 3 x 32 x 32, int64) and class names."""
    _, train_files, test_files = CIFAR_LAYOUT[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    num_classes = 10 if name == "cifar10" else 100
    parts: list[Tensor] = []
    for files in (train_files, test_files):
        xs, ys = zip(*(_read_batch(directory / f, label_key) for f in files))
        x, y = torch.cat(xs), torch.cat(ys)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(
                f"{directory}: labels span [{int(y.min())}, {int(y.max())}], expected [0, {num_classes - 1}]"
            )
        parts += [x, y]
    classes = CIFAR10_CLASSES if name == "cifar10" else _cifar100_classes(directory)
    return parts[0], parts[1], parts[2], parts[3], classes


def _cifar100_classes(directory: Path) -> tuple[str, ...]:
    """Fine class names from ``meta`` when present; the label numbers otherwise."""
    meta = directory / "meta"
    if meta.is_file():
        try:
            with meta.open("rb") as f:
                names = _ArrayUnpickler(f, encoding="bytes").load()
            names = {k.decode() if isinstance(k, bytes) else k: v for k, v in names.items()}
            fine = [
                n.decode() if isinstance(n, bytes) else str(n) for n in names["fine_label_names"]
            ]
            if len(fine) == 100:
                return tuple(fine)
        except Exception:  # names are cosmetic: never fail a load on them
            pass
    return tuple(str(i) for i in range(100))
