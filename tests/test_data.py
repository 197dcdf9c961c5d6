"""Datasets: every loader on small files in the real formats, lookup order, errors, batches."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from timeprest.data import (
    STATS,
    Dataset,
    augment_batch,
    load_dataset,
    make_batches,
    subset,
)
from timeprest.data import download as dl
from timeprest.errors import ConfigError, DataError

_REAL_FETCH = dl.fetch


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, no system datasets, no $TIMEPREST_DATA, and a private cache, in every test."""

    def no_network(url: str, dest: Path, md5: str, *, timeout: float = 0) -> None:
        raise OSError(f"network disabled in tests ({url})")

    monkeypatch.setattr(dl, "fetch", no_network)
    monkeypatch.setattr(dl, "SYSTEM_DIRS", {})
    monkeypatch.delenv(dl.ENV_VAR, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


# ---------------------------------------------------------------- file writers


def idx_bytes(data: torch.Tensor) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    return header + data.to(torch.uint8).contiguous().numpy().tobytes()


def write_idx_set(
    directory: Path,
    *,
    n_train: int = 12,
    n_test: int = 6,
    label: int | None = None,
    gz: bool = True,
    size: int = 28,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The four MNIST files; labels are ``label`` everywhere when given (to tell sets apart)."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, size, size), generator=g, dtype=torch.uint8)
        if label is None:
            labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        else:
            labels = torch.full((n,), label, dtype=torch.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = idx_bytes(arr)
            name = f"{part}-{kind}-ubyte"
            if gz:
                (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)
            arrays[f"{part}-{kind}"] = arr
    return arrays


def write_cifar(root: Path, name: str, per_batch: int = 4, key_type: type = bytes) -> np.ndarray:
    """A CIFAR folder in the python-pickle layout; returns the first train batch's data."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, label_key, k = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            "labels",
            10,
        )
    else:
        folder, files, label_key, k = (
            root / "cifar-100-python",
            ["train", "test"],
            "fine_labels",
            100,
        )
    folder.mkdir(parents=True)
    first = None
    for f in files:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, k, per_batch)]
        batch = {key_type(b"data" if key_type is bytes else "data"): data,
                 key_type(label_key.encode() if key_type is bytes else label_key): labels}  # fmt: skip
        with (folder / f).open("wb") as out:
            pickle.dump(batch, out, protocol=2)
        if first is None:
            first = data
    if name == "cifar100":
        meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    assert first is not None
    return first


# ---------------------------------------------------------------- MNIST-like


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loads_and_normalises(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path / "d", gz=gz)
    pair = load_dataset("fashion-mnist", tmp_path / "d")
    assert pair.train.x.shape == (12, 1, 28, 28) and pair.test.x.shape == (6, 1, 28, 28)
    assert pair.train.x.dtype == torch.float32 and pair.train.y.dtype == torch.int64
    assert (pair.num_classes, pair.in_channels, pair.image_size) == (10, 1, 28)
    assert pair.classes[0] == "T-shirt/top" and pair.source == str(tmp_path / "d")
    assert torch.equal(pair.train.y, arrays["train-labels-idx1"].long())
    (mean,), (std,) = STATS["fashion-mnist"]
    expected = (arrays["t10k-images-idx3"].float() / 255 - mean) / std
    torch.testing.assert_close(pair.test.x[:, 0], expected)


def test_idx_dotted_names_and_resize(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_idx_set(d, gz=False)
    for f in list(d.iterdir()):  # train-images.idx3-ubyte, as some mirrors name them
        f.rename(d / f.name.replace("-idx", ".idx"))
    pair = load_dataset("mnist", d, image_size=14)
    assert pair.train.x.shape == (12, 1, 14, 14) and pair.image_size == 14
    assert pair.mean == STATS["mnist"][0]


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda raw: b"\x00\x00\x08\x02" + raw[4:], "magic number 0x00000802"),
        (lambda raw: raw[:-10], "truncated or corrupt"),
        (lambda raw: raw[:3], "too short"),
    ],
)
def test_idx_corrupt_file_names_it(
    tmp_path: Path, damage: Callable[[bytes], bytes], words: str
) -> None:
    d = tmp_path / "d"
    write_idx_set(d, gz=False)
    bad = d / "train-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataError, match=words) as e:
        load_dataset("mnist", d)
    assert str(bad) in str(e.value)


def test_idx_bad_gzip_and_count_mismatch(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_idx_set(d)
    bad = d / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:40])  # a cut gzip stream
    with pytest.raises(DataError, match="cannot read .*t10k-images"):
        load_dataset("mnist", d)
    write_idx_set(d)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(torch.zeros(5))))
    with pytest.raises(DataError, match="holds 12 images but .* holds 5 labels"):
        load_dataset("mnist", d)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: Path) -> None:
    # One copy per place, told apart by their labels.
    write_idx_set(tmp_path / "given", label=1)
    write_idx_set(tmp_path / "env" / "fashion-mnist", label=2)
    write_idx_set(tmp_path / "env", label=3)
    write_idx_set(tmp_path / "system", label=4)
    write_idx_set(offline / "timeprest" / "fashion-mnist", label=5)
    monkeypatch.setenv("TIMEPREST_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(dl, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "system",)})

    def label() -> int:
        return int(load_dataset("fashion-mnist", data_dir).train.y[0])

    data_dir: Path | None = tmp_path / "given"
    assert label() == 1
    data_dir = None
    assert label() == 2  # $TIMEPREST_DATA/<name> before $TIMEPREST_DATA
    for f in (tmp_path / "env" / "fashion-mnist").iterdir():
        f.unlink()
    assert label() == 3
    monkeypatch.delenv("TIMEPREST_DATA")
    assert label() == 4
    monkeypatch.setattr(dl, "SYSTEM_DIRS", {})
    assert label() == 5
    # The system directory is for fashion-mnist only: mnist skips it.
    monkeypatch.setattr(dl, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "system",)})
    with pytest.raises(DataError):
        load_dataset("mnist", download=False)


def test_missing_offline_gives_one_line_fix(offline: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert "\n" not in msg
    assert "download failed" in msg and "network disabled in tests" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert str(offline / "timeprest" / "fashion-mnist") in msg
    with pytest.raises(DataError, match="download=False.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", download=False)


def test_download_into_cache_with_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: Path
) -> None:
    # A local "server": file:// URLs need no network but go through urllib.
    write_idx_set(tmp_path / "server", label=7)
    remotes = tuple(
        dl.Remote(
            f.name,
            ("file://" + str(tmp_path / "nowhere" / f.name), "file://" + str(f)),
            dl.md5sum(f),
        )
        for f in sorted((tmp_path / "server").iterdir())
    )
    monkeypatch.setitem(dl.REMOTES, "mnist", remotes)
    monkeypatch.setattr(dl, "fetch", _REAL_FETCH)
    pair = load_dataset("mnist")
    assert pair.source == str(offline / "timeprest" / "mnist") and int(pair.train.y[0]) == 7
    assert sorted(p.name for p in (offline / "timeprest" / "mnist").iterdir()) == sorted(
        r.filename for r in remotes
    )
    # Present in the cache now: no second download.
    monkeypatch.setattr(dl, "fetch", lambda *a, **k: pytest.fail("downloaded again"))
    assert int(load_dataset("mnist").test.y[0]) == 7


def test_fetch_checks_md5_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"hello")
    dest = tmp_path / "out.bin"
    with pytest.raises(DataError, match="checksum mismatch"):
        _REAL_FETCH("file://" + str(src), dest, "0" * 32)
    assert not dest.exists() and not (tmp_path / "out.bin.part").exists()
    _REAL_FETCH("file://" + str(src), dest, hashlib.md5(b"hello").hexdigest())
    assert dest.read_bytes() == b"hello"


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("key_type", [bytes, str])
def test_cifar10_layout_and_pixels(tmp_path: Path, key_type: type) -> None:
    first = write_cifar(tmp_path, "cifar10", key_type=key_type)
    pair = load_dataset("cifar10", tmp_path)
    assert pair.train.x.shape == (20, 3, 32, 32) and pair.test.x.shape == (4, 3, 32, 32)
    assert (pair.num_classes, pair.in_channels, pair.augment_default) == (10, 3, True)
    assert pair.classes[0] == "airplane"
    # Row layout: 1024 red values, then green, then blue, each row-major 32 x 32.
    mean, std = STATS["cifar10"]
    for c, (row, col) in ((0, (0, 1)), (1, (5, 7)), (2, (31, 30))):
        raw = first[0, c * 1024 + row * 32 + col] / 255
        assert pair.train.x[0, c, row, col].item() == pytest.approx(
            (raw - mean[c]) / std[c], abs=1e-5
        )
    # Pointing at the batch folder itself works too.
    assert len(load_dataset("cifar10", tmp_path / "cifar-10-batches-py").train) == 20


def test_cifar100_and_meta(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100", per_batch=5)
    pair = load_dataset("cifar100", tmp_path, image_size=16)
    assert pair.train.x.shape == (5, 3, 16, 16) and pair.num_classes == 100
    assert pair.classes[:2] == ("c0", "c1")


def test_cifar_corrupt_and_unsafe_pickles(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path)
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="expected uint8 N x 3072"):
        load_dataset("cifar10", tmp_path)


def test_cifar_download_extracts_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: Path
) -> None:
    write_cifar(tmp_path / "src", "cifar10")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    remote = dl.Remote(archive.name, ("file://" + str(archive),), dl.md5sum(archive), extract=True)
    monkeypatch.setitem(dl.REMOTES, "cifar10", (remote,))
    monkeypatch.setattr(dl, "fetch", _REAL_FETCH)
    pair = load_dataset("cifar10")
    assert len(pair.train) == 20
    assert pair.source == str(offline / "timeprest" / "cifar10" / "cifar-10-batches-py")
    assert not (offline / "timeprest" / "cifar10" / archive.name).exists()


# ---------------------------------------------------------------- image folder


def write_png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value,) * len(mode)
    Image.new(mode, size, color).save(path)


def make_folder(root: Path) -> None:
    write_png(root / "train" / "cat" / "a.png", (10, 7), "RGB", 10)
    write_png(root / "train" / "cat" / "b.png", (5, 5), "L", 20)
    write_png(root / "train" / "ant" / "c.png", (12, 12), "RGBA", 30)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    write_png(root / "test" / "cat" / "d.png", (9, 9), "RGB", 40)
    write_png(root / "test" / "ant" / "e.png", (9, 9), "RGB", 50)


def test_image_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs")
    pair = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=8)
    assert pair.classes == ("ant", "cat") and pair.num_classes == 2
    assert pair.train.x.shape == (3, 3, 8, 8) and pair.test.x.shape == (2, 3, 8, 8)
    assert pair.train.y.tolist() == [0, 1, 1] and pair.test.y.tolist() == [0, 1]
    # Normalised with the training set's own statistics; uniform images stay uniform.
    assert abs(pair.train.x.mean().item()) < 1e-5
    assert torch.allclose(pair.test.x[0], pair.test.x[0, :, :1, :1].expand(3, 8, 8))
    assert load_dataset(f"imagefolder:{tmp_path / 'imgs'}").image_size == 32


def test_image_folder_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    make_folder(root)
    bad = root / "test" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(f"imagefolder:{root}")
    bad.unlink()
    write_png(root / "test" / "zebra" / "z.png", (4, 4), "RGB", 1)
    with pytest.raises(DataError, match="zebra has no counterpart"):
        load_dataset(f"imagefolder:{root}")
    with pytest.raises(DataError, match="train/train is missing"):
        load_dataset(f"imagefolder:{root / 'train'}")
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("imagefolder:")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(DataError, match="pip install pillow"):
        load_dataset(f"imagefolder:{root}")


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_sized() -> None:
    a, b, c = (
        load_dataset("synthetic", seed=3),
        load_dataset("synthetic", seed=3),
        load_dataset("synthetic", seed=4),
    )
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert a.train.x.shape == (2048, 1, 28, 28) and len(a.test) == 512 and a.num_classes == 10
    assert torch.bincount(a.train.y).tolist() == [205] * 8 + [204] * 2  # balanced
    s = load_dataset("synthetic:train=64,test=16,classes=3,channels=3,noise=0.5", image_size=12)
    assert s.train.x.shape == (64, 3, 12, 12) and s.num_classes == 3 and len(s.classes) == 3
    with pytest.raises(ConfigError, match="bad option 'trian=5'"):
        load_dataset("synthetic:trian=5")
    with pytest.raises(ConfigError, match="needs a number"):
        load_dataset("synthetic:train=many")
    with pytest.raises(ConfigError, match="classes must be >= 2"):
        load_dataset("synthetic:classes=1")


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match="unknown dataset 'fashion'; valid names: fashion-mnist, mnist, cifar10"
    ):
        load_dataset("fashion")
    with pytest.raises(ConfigError, match="image_size must be >= 1"):
        load_dataset("synthetic", image_size=0)


# ---------------------------------------------------------------- batches


def small_set(n: int = 10) -> Dataset:
    return Dataset(torch.arange(n * 12, dtype=torch.float32).reshape(n, 3, 2, 2), torch.arange(n))


def test_batches_cover_every_row_once_deterministically() -> None:
    ds = small_set(10)
    b = make_batches(ds, 4, seed=1, epoch=0)
    assert len(b) == 3 and [len(y) for _, y in b] == [4, 4, 2]
    rows = torch.cat([y for _, y in b])
    assert sorted(rows.tolist()) == list(range(10)) and rows.tolist() != list(range(10))
    again = make_batches(ds, 4, seed=1, epoch=0)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(b, again))
    assert torch.equal(b[-1][1], b[2][1]) and len(b[0:2]) == 2
    other = torch.cat([y for _, y in make_batches(ds, 4, seed=1, epoch=1)])
    assert other.tolist() != rows.tolist()
    plain = make_batches(ds, 4, shuffle=False, drop_last=True)
    assert len(plain) == 2 and plain[1][1].tolist() == [4, 5, 6, 7]
    assert torch.equal(plain[0][0], ds.x[:4])
    with pytest.raises(IndexError):
        plain[2]
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        make_batches(ds, 0)
    with pytest.raises(ConfigError, match="leaves no batch"):
        make_batches(ds, 11, drop_last=True)


def test_augmentation_is_a_shifted_possibly_flipped_crop() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    out = augment_batch(x, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        candidates = [
            padded[i, :, oy : oy + 8, ox : ox + 8].flip(-1) if flip else padded[i, :, oy : oy + 8, ox : ox + 8]
            for oy in range(9) for ox in range(9) for flip in (False, True)
        ]  # fmt: skip
        assert any(torch.equal(out[i], c) for c in candidates)
    ds = Dataset(x, torch.zeros(6, dtype=torch.int64))
    a = make_batches(ds, 4, augment=True, seed=5)
    b = make_batches(ds, 4, augment=True, seed=5)
    assert a[0][0].shape == (4, 3, 8, 8) and a[1][0].shape == (2, 3, 8, 8)
    assert torch.equal(a[1][0], b[1][0]) and torch.equal(a[0][0], a[0][0])
    assert not torch.equal(a[0][0], make_batches(ds, 4, augment=True, seed=6)[0][0])


def test_dataset_checks_shapes() -> None:
    with pytest.raises(DataError, match="N x C x H x W"):
        Dataset(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(DataError, match="images: 3"):
        Dataset(torch.zeros(3, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
    assert len(subset(small_set(10), 3, seed=0, part="train")) == 3
