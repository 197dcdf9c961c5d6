"""--train-limit / --test-limit: a seeded random subset of the rows, not the first rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_cli
from timeprest.data import load_dataset, num_batches, subset
from timeprest.errors import ConfigError

CLASSES = ("ant", "bee", "cat", "dog", "eel")


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory) -> Path:
    """An image folder read in class order: 20 train and 10 test images per class.

    Each image's grey level names its class and its index, so rows can be told apart.
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    for part, per_class in (("train", 20), ("test", 10)):
        for c, name in enumerate(CLASSES):
            d = root / part / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("L", (4, 4), 40 * c + i).save(d / f"{i:02d}.png")
    return root


def test_the_folder_is_sorted_by_class(sorted_folder):
    pair = load_dataset(f"imagefolder:{sorted_folder}")
    # what makes the first rows a bad sample: the first 40 hold 2 of the 5 classes
    assert pair.train.y[:40].unique().tolist() == [0, 1]


def test_a_limited_subset_holds_every_class(sorted_folder):
    pair = load_dataset(f"imagefolder:{sorted_folder}")
    for seed in (0, 1, 2):
        train = subset(pair.train, 40, seed=seed, part="train")
        test = subset(pair.test, 25, seed=seed, part="test")
        assert len(train) == 40 and len(test) == 25
        assert train.y.unique().tolist() == list(range(5)), seed
        assert test.y.unique().tolist() == list(range(5)), seed


def test_the_subset_is_the_same_for_a_seed(sorted_folder):
    pair = load_dataset(f"imagefolder:{sorted_folder}")
    again = load_dataset(f"imagefolder:{sorted_folder}")  # a new load, as a new run does
    a = subset(pair.train, 40, seed=3, part="train")
    b = subset(again.train, 40, seed=3, part="train")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = subset(pair.train, 40, seed=4, part="train")
    assert not torch.equal(a.x, other.x)  # another seed draws other rows


def test_a_limit_not_below_the_size_keeps_every_row():
    from timeprest.data import Dataset

    ds = Dataset(torch.arange(6.0).view(6, 1, 1, 1), torch.arange(6))
    assert subset(ds, 6, seed=0, part="train") is ds
    assert subset(ds, 100, seed=0, part="train") is ds
    with pytest.raises(ConfigError, match=">= 1"):
        subset(ds, 0, seed=0, part="train")


def test_steps_per_epoch():
    assert [num_batches(r, 32) for r in (1, 32, 33, 256)] == [1, 1, 2, 8]
    assert num_batches(33, 32, drop_last=True) == 1


def test_train_header_names_the_classes_of_the_subset(sorted_folder, tmp_path):
    rc, out, err = run_cli(
        "train", "--dataset", f"imagefolder:{sorted_folder}", "--model", "mlp",
        "--stages", "2", "--balance", "params", "--batch-size", "8", "--epochs", "1",
        "--train-limit", "40", "--test-limit", "25", "--no-progress",
        "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert rc == 0, err
    header = out.splitlines()[0]
    assert "40 train rows in 5 classes / 25 test rows in 5 classes, of 5" in header, header
