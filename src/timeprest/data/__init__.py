"""Datasets as in-memory tensors, and their mini-batches.

``load_dataset(name)`` returns a :class:`DatasetPair` (train and test
:class:`Dataset`, normalised float32 images and int64 labels, plus what a
model needs: ``num_classes``, ``in_channels``, ``image_size``);
``make_batches`` cuts one epoch of a set into mini-batches, deterministically
from ``(seed, epoch)``.
"""

from timeprest.data.batches import (
    Batches,
    augment_batch,
    derive_seed,
    make_batches,
    num_batches,
    subset,
)
from timeprest.data.dataset import Dataset, DatasetPair
from timeprest.data.download import ENV_VAR, cache_dir, search_dirs
from timeprest.data.load import DATASET_NAMES, DEFAULT_DATASET, STATS, load_dataset
from timeprest.data.synthetic import SyntheticSpec, make_synthetic

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_DATASET",
    "ENV_VAR",
    "STATS",
    "Batches",
    "Dataset",
    "DatasetPair",
    "SyntheticSpec",
    "augment_batch",
    "cache_dir",
    "derive_seed",
    "load_dataset",
    "make_batches",
    "make_synthetic",
    "num_batches",
    "search_dirs",
    "subset",
]
