"""Causal language modelling on byte-level text: next-byte cross-entropy, bits per byte.

Inputs and targets are token windows shifted by one
(:class:`timeprest.data.text.TextBatches`); the loss is the mean over every
position of every row. Held-out figures: loss in nats per token, bits per
byte (= nats / ln 2, since a token is a byte), perplexity (= e^loss) and the
fraction of next bytes predicted right. The validation windows start at 0,
``block_size``, ... in order (``--test-limit`` keeps the first ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from timeprest.errors import ConfigError
from timeprest.models.gpt import lm_loss
from timeprest.tasks.base import DataInfo, Metrics, Minibatch, nats_to_bits, sum_over_batches


class LanguageModelTask:
    """The task of ``shakespeare`` and ``text:PATH``: a ``gpt`` over byte tokens."""

    name = "lm"

    def __init__(self, cfg: Any) -> None:
        from timeprest.data.text import VOCAB_SIZE
        from timeprest.models import parse_model_options

        if cfg.model != "gpt":
            raise ConfigError(
                f"dataset {cfg.dataset} is byte-level text: train it with --model gpt, "
                f"not {cfg.model}"
            )
        options = parse_model_options(cfg.model_opt)
        vocab = options.setdefault("vocab_size", VOCAB_SIZE)
        if vocab != VOCAB_SIZE:
            raise ConfigError(
                f"--model-opt vocab_size={vocab}: byte-level text has {VOCAB_SIZE} tokens"
            )
        self.cfg = cfg
        self.options = options
        self.block_size = int(options.get("block_size", 128))

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return lm_loss(output, target)

    def model_options(self) -> dict[str, int | float | bool]:
        return dict(self.options)

    def load(self) -> tuple[Any, Any, DataInfo]:
        from timeprest.data.text import VOCAB_SIZE, load_text, window_count

        cfg, b = self.cfg, self.block_size
        corpus = load_text(cfg.dataset)
        train_rows = window_count(len(corpus.train), b)
        test_rows = window_count(len(corpus.validation), b)
        if train_rows < 1 or test_rows < 1:
            raise ConfigError(
                f"{cfg.dataset}: {len(corpus.train)} train and {len(corpus.validation)} "
                f"validation bytes are too few for windows of {b + 1} tokens; use a smaller "
                "--model-opt block_size or more text"
            )
        train_rows = min(train_rows, cfg.train_limit or train_rows)
        test_rows = min(test_rows, cfg.test_limit or test_rows)
        described = (
            f"{len(corpus.train):,} train bytes, {train_rows} windows of {b + 1} tokens per "
            f"epoch / {len(corpus.validation):,} validation bytes, {test_rows} windows"
        )
        info = DataInfo(self.name, 1, VOCAB_SIZE, b, False, train_rows, test_rows, described)
        return corpus.train, corpus.validation, info

    def train_batches(self, train: Any, info: DataInfo, epoch: int) -> Sequence[Minibatch]:
        from timeprest.data.text import TextBatches

        cfg = self.cfg
        return TextBatches(
            train,
            self.block_size,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            epoch=epoch,
            limit=info.train_rows,
        )

    def sample_input(self, train: Any, rows: int) -> Tensor:
        from timeprest.data.text import TextBatches

        return TextBatches(train, self.block_size, rows, shuffle=False)[0][0]

    def evaluate(self, model: nn.Module, test: Any, batch_size: int, device: str) -> Metrics:
        from timeprest.data.text import TextBatches

        def count(out: Tensor, y: Tensor) -> tuple[float, int, int]:
            flat, targets = out.reshape(-1, out.shape[-1]).float(), y.reshape(-1)
            loss = float(F.cross_entropy(flat, targets, reduction="sum"))
            return loss, int((flat.argmax(1) == targets).sum()), int(targets.numel())

        batches = TextBatches(
            test, self.block_size, batch_size, shuffle=False, limit=self.cfg.test_limit
        )
        loss, right, n = sum_over_batches(model, batches, device, count)
        nats = loss / max(n, 1)
        # e^loss overflows a float beyond ~709 nats (a diverged model): infinity then
        ppl = math.exp(nats) if nats < 700 else math.inf
        return Metrics(nats, right / max(n, 1), nats_to_bits(nats), ppl)
