"""Image classification: images and labels in memory, cross-entropy, accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from timeprest.errors import ConfigError
from timeprest.tasks.base import DataInfo, Metrics, Minibatch, sum_over_batches


class ClassificationTask:
    """The task of every image dataset (``fashion-mnist``, ``cifar10``, ``synthetic``, ...)."""

    name = "classification"

    def __init__(self, cfg: Any) -> None:
        if cfg.model == "gpt":
            raise ConfigError(
                f"--model gpt is a language model over byte-level text, and {cfg.dataset} is "
                "an image dataset: use --dataset shakespeare or text:PATH, or an image model"
            )
        self.cfg = cfg

    def loss_fn(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def load(self) -> tuple[Any, Any, DataInfo]:
        from timeprest.data import load_dataset, subset

        cfg = self.cfg
        data = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)
        train, test = data.train, data.test
        if cfg.train_limit:
            train = subset(train, cfg.train_limit, seed=cfg.seed, part="train")
        if cfg.test_limit:
            test = subset(test, cfg.test_limit, seed=cfg.seed, part="test")
        described = (
            f"{len(train)} train rows in {int(train.y.unique().numel())} classes / "
            f"{len(test)} test rows in {int(test.y.unique().numel())} classes, "
            f"of {data.num_classes}"
        )
        info = DataInfo(
            self.name,
            data.in_channels,
            data.num_classes,
            data.image_size,
            data.augment_default if cfg.augment is None else cfg.augment,
            len(train),
            len(test),
            described,
        )
        return train, test, info

    def model_options(self) -> dict[str, int | float | bool]:
        from timeprest.models import parse_model_options

        return parse_model_options(self.cfg.model_opt)

    def train_batches(self, train: Any, info: DataInfo, epoch: int) -> Sequence[Minibatch]:
        from timeprest.data import make_batches

        cfg = self.cfg
        return make_batches(
            train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, augment=info.augment
        )

    def sample_input(self, train: Any, rows: int) -> Tensor:
        x: Tensor = train.x[:rows]
        return x

    def evaluate(self, model: nn.Module, test: Any, batch_size: int, device: str) -> Metrics:
        def count(out: Tensor, y: Tensor) -> tuple[float, int, int]:
            loss = float(F.cross_entropy(out, y, reduction="sum"))
            return loss, int((out.argmax(1) == y).sum()), int(y.numel())

        batches = (
            (test.x[i : i + batch_size], test.y[i : i + batch_size])
            for i in range(0, len(test), batch_size)
        )
        loss, right, n = sum_over_batches(model, batches, device, count)
        n = max(n, 1)
        return Metrics(loss / n, right / n)
