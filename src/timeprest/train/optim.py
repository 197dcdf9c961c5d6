"""The optimizer each stage builds, and the learning-rate factor of every update.

``make_optimizer(cfg)`` is the factory :class:`timeprest.Pipeline` calls once
per stage with that stage's parameters; ``lr_factor`` is the warm-up and
cosine (or constant) schedule the stage runners apply per update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from timeprest.stage.sync import Tied
from timeprest.train.config import TrainConfig


def make_optimizer(
    cfg: TrainConfig, no_decay: frozenset[int] = frozenset()
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The optimizer factory each stage calls with its parameters.

    AdamW puts the parameters whose ids are in ``no_decay`` (norms, biases,
    embeddings: see :func:`no_decay_ids`) in a second group without weight
    decay, inside each stage's one optimizer.
    """

    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "nadam":  # with pipedream: the Nesterov method (docs/design.md 12)
            return torch.optim.NAdam(
                params,
                lr=cfg.lr,
                betas=(cfg.momentum, 0.999),
                weight_decay=cfg.weight_decay,
                decoupled_weight_decay=True,
            )
        decay = [p for p in params if id(p) not in no_decay]
        plain = [p for p in params if id(p) in no_decay]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=cfg.lr)

    return build


def no_decay_ids(stages: Sequence[nn.Module | None], tied: Sequence[Tied] = ()) -> frozenset[int]:
    """Ids of the parameters weight decay leaves alone: norms, biases, embeddings, tied copies.

    A tied tensor's copies must be updated alike (docs/design.md section 11), so
    every copy follows its embedding into this set.
    """
    out: set[int] = set()
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.Embedding)
    for stage in stages:
        if stage is None:
            continue
        for module in stage.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, norms) or name == "bias":
                    out.add(id(p))
    for group in tied:
        for s, name in group:
            stage = stages[s]
            if stage is not None:
                out.add(id(stage.get_parameter(name)))
    return frozenset(out)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate factor of the update of mini-batch ``t`` (warm-up, then constant or cosine)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t - warm, span) / span))

    return factor
