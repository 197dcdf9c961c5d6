"""Tasks: what a batch is, the loss and the held-out metrics (docs/design.md section 13).

``task_for(cfg)`` chooses the task of a run from its dataset: byte-level text
(``shakespeare``, ``text:PATH``) is causal language modelling, every image
dataset is classification.
"""

from __future__ import annotations

from typing import Any

from timeprest.tasks.base import DataInfo, Metrics, Task, nats_to_bits
from timeprest.tasks.classification import ClassificationTask
from timeprest.tasks.lm import LanguageModelTask


def task_for(cfg: Any) -> Task:
    """The task of run ``cfg`` (a TrainConfig)."""
    from timeprest.data.text import is_text_dataset

    if is_text_dataset(cfg.dataset):
        return LanguageModelTask(cfg)
    return ClassificationTask(cfg)


__all__ = [
    "ClassificationTask",
    "DataInfo",
    "LanguageModelTask",
    "Metrics",
    "Task",
    "nats_to_bits",
    "task_for",
]
