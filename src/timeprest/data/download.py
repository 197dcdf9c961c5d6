"""Where datasets are looked for on disk, and how they are fetched when absent.

Search order for a dataset ``<name>`` (first directory holding all its files wins):

1. ``data_dir`` given by the caller (``data_dir/<name>`` first, then ``data_dir``),
2. ``$TIMEPREST_DATA/<name>``, then ``$TIMEPREST_DATA``,
3. system directories (``/usr/share/datasets/fashion-mnist``, from Debian's
   ``dataset-fashion-mnist`` package),
4. the user cache ``$XDG_CACHE_HOME/timeprest/<name>`` (``~/.cache/timeprest/<name>``).

A subfolder named after the dataset (or torchvision's ``MNIST/raw``,
``FashionMNIST/raw``) is tried before its parent so that one
``$TIMEPREST_DATA`` can hold several datasets whose files share names
(MNIST and Fashion-MNIST do). When nothing is found and downloading is
allowed, the official files are fetched into the cache and their published
MD5 checksums checked. Files found on disk are not checksummed, only
validated by their readers: Debian recompresses the Fashion-MNIST files, so
their MD5s differ from the published ones while the contents are the same.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from timeprest.errors import DataError

ENV_VAR = "TIMEPREST_DATA"
TIMEOUT_S = 20.0
"""Socket timeout of one download request: short, so an offline machine fails fast."""


@dataclass(frozen=True)
class Remote:
    """A downloadable file: mirrors tried in order, the published MD5, and whether to untar it."""

    filename: str
    urls: tuple[str, ...]
    md5: str
    extract: bool = False


_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# yann.lecun.com is the original home of MNIST but often refuses downloads;
# the PyTorch mirror serves the byte-identical files (same MD5).
_MNIST = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
_CIFAR = "https://www.cs.toronto.edu/~kriz/"

# Checksums as published by the dataset authors (Fashion-MNIST README, the
# CIFAR page) and, for MNIST, as used by torchvision since the files appeared.
REMOTES: dict[str, tuple[Remote, ...]] = {
    "fashion-mnist": (
        Remote("train-images-idx3-ubyte.gz", (_FASHION + "train-images-idx3-ubyte.gz",), "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        Remote("train-labels-idx1-ubyte.gz", (_FASHION + "train-labels-idx1-ubyte.gz",), "25c81989df183df01b3e8a0aad5dffbe"),
        Remote("t10k-images-idx3-ubyte.gz", (_FASHION + "t10k-images-idx3-ubyte.gz",), "bef4ecab320f06d8554ea6380940ec79"),
        Remote("t10k-labels-idx1-ubyte.gz", (_FASHION + "t10k-labels-idx1-ubyte.gz",), "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    "mnist": (
        Remote("train-images-idx3-ubyte.gz", tuple(u + "train-images-idx3-ubyte.gz" for u in _MNIST), "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        Remote("train-labels-idx1-ubyte.gz", tuple(u + "train-labels-idx1-ubyte.gz" for u in _MNIST), "d53e105ee54ea40749a09fcbcd1e9432"),
        Remote("t10k-images-idx3-ubyte.gz", tuple(u + "t10k-images-idx3-ubyte.gz" for u in _MNIST), "9fb629c4189551a2d022fa330f9573f3"),
        Remote("t10k-labels-idx1-ubyte.gz", tuple(u + "t10k-labels-idx1-ubyte.gz" for u in _MNIST), "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "cifar10": (
        Remote("cifar-10-python.tar.gz", (_CIFAR + "cifar-10-python.tar.gz",), "c58f30108f718f92721af3b95e74349a", extract=True),
    ),
    "cifar100": (
        Remote("cifar-100-python.tar.gz", (_CIFAR + "cifar-100-python.tar.gz",), "eb9058c3a382ffc7106e4002c42a8d85", extract=True),
    ),
}  # fmt: skip

# Directories installed by system packages, per dataset.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

# Other folder names a dataset is commonly kept under (torchvision's layout).
_ALIASES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("FashionMNIST/raw",),
    "mnist": ("MNIST/raw",),
}

# What to tell a user who has none of the files, per dataset.
_HOW_TO_GET = {
    "fashion-mnist": "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu), or put "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    f"t10k-labels-idx1-ubyte.gz from {_FASHION} into {{cache}}",
    "mnist": "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    f"t10k-labels-idx1-ubyte.gz from {_MNIST[1]} into {{cache}}",
    "cifar10": f"download {_CIFAR}cifar-10-python.tar.gz and run: tar xzf cifar-10-python.tar.gz -C {{cache}}",
    "cifar100": f"download {_CIFAR}cifar-100-python.tar.gz and run: tar xzf cifar-100-python.tar.gz -C {{cache}}",
}

T = TypeVar("T")

# What a failed download raises: socket and HTTP errors (URLError is an
# OSError), a server that hangs up mid-body, a malformed mirror URL.
_FETCH_ERRORS = (OSError, http.client.HTTPException, ValueError, DataError)


def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/timeprest/<name>``, ``~/.cache/timeprest/<name>`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "timeprest" / name


def search_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Directories to look in for dataset ``name``, in order."""
    roots: list[Path] = []
    for base in (data_dir, os.environ.get(ENV_VAR) or None):
        if base is not None:
            root = Path(base).expanduser()
            roots += [root / name, *(root / a for a in _ALIASES.get(name, ())), root]
    roots += SYSTEM_DIRS.get(name, ())
    roots.append(cache_dir(name))
    return roots


def locate(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    find: Callable[[Path], T | None],
    download: bool,
) -> tuple[T, Path]:
    """The first hit of ``find`` over the search directories, downloading into the cache if allowed.

    ``find`` maps a directory to what the loader needs from it (or None when
    the directory does not hold the dataset). Returns that and the directory.
    """
    dirs = search_dirs(name, data_dir)
    for d in dirs:
        if d.is_dir():
            hit = find(d)
            if hit is not None:
                return hit, d
    cache = cache_dir(name)
    looked = ", ".join(str(d) for d in dirs)
    how = _HOW_TO_GET[name].format(cache=cache)
    if not download:
        raise DataError(
            f"{name} not found (looked in {looked}) and download=False; to get it: {how}"
        )
    try:
        fetch_dataset(name, cache)
    except _FETCH_ERRORS as e:
        reason = str(e).replace("\n", " ")
        raise DataError(
            f"{name} not found (looked in {looked}) and the download failed ({reason}); to get it: {how}"
        ) from e
    hit = find(cache)
    if hit is None:
        raise DataError(
            f"{name}: downloaded into {cache} but the files are not there; to get it: {how}"
        )
    return hit, cache


def fetch_dataset(name: str, dest: Path) -> None:
    """Download every file of dataset ``name`` into ``dest`` (trying mirrors in order), untarring archives."""
    dest.mkdir(parents=True, exist_ok=True)
    for remote in REMOTES[name]:
        target = dest / remote.filename
        if not (target.is_file() and md5sum(target) == remote.md5):
            errors: list[str] = []
            for url in remote.urls:
                try:
                    fetch(url, target, remote.md5)
                    break
                except _FETCH_ERRORS as e:
                    errors.append(f"{url}: {e}")
            else:
                raise DataError("; ".join(errors))
        if remote.extract:
            _untar(target, dest)
            target.unlink()  # the extracted folder is what is read; no need to keep both


def fetch(url: str, dest: Path, md5: str, *, timeout: float = TIMEOUT_S) -> None:
    """Download ``url`` to ``dest`` and check its MD5; ``dest`` only appears when the download is whole and right."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        got = md5sum(part)
        if got != md5:
            raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # a published integrity check, not security
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _untar(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths, links out of dest, devices
            # (Python >= 3.10.12 / 3.11.4); without it, check member paths by hand.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                root = dest.resolve()
                for member in tar.getmembers():
                    if not (dest / member.name).resolve().is_relative_to(root):
                        raise DataError(
                            f"{archive}: member {member.name} would land outside {dest}"
                        )
                tar.extractall(dest)
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"cannot extract {archive}: {e}; delete it and fetch it again") from e
