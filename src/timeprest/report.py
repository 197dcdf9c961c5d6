"""What every run reports (docs/design.md section 8)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_DISTANCE_EVERY = 10
"""Mini-batches between two measurements of the relative distance (1: every one)."""


@dataclass
class StageStep:
    """Version facts of one mini-batch at one stage.

    ``forward_versions``: the version each micro-batch's forward read.
    ``backward_version``: the latest version at the backward (``k``).
    ``staleness``: ``k - v`` per micro-batch.
    ``relative_distance``: mean over micro-batches of
    ``||w_backward - w_latest|| / ||w_latest||``; measured at the mini-batches
    whose global index is a multiple of ``distance_every``, None at the others
    unless every micro-batch read the latest weights (then exactly 0).
    """

    forward_versions: list[int] = field(default_factory=list)
    backward_version: int = -1
    staleness: list[int] = field(default_factory=list)
    relative_distance: float | None = 0.0


@dataclass
class MinibatchReport:
    minibatch: int
    loss: float
    stages: list[StageStep]


@dataclass
class StageReport:
    """Per-stage memory figures, measured on the tensors actually held."""

    stage: int
    weight_bytes: int = 0  # one version of the trainable parameters
    peak_versions: int = 1  # stored versions held at once (latest included)
    peak_weight_bytes: int = 0  # held versions plus a transient intermediate weight
    peak_activation_bytes: int = 0  # saved tensors of in-flight micro-batches
    optimizer_state_bytes: int = 0
    updates: int = 0  # version counter: updates applied so far
    extra_buffers: int = 0  # weight-sized remedy buffers (velocity, running average)
    extra_buffer_bytes: int = 0


@dataclass
class Report:
    stages: list[StageReport] = field(default_factory=list)
    minibatches: list[MinibatchReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mean_staleness(self, stage: int) -> float:
        vals = [d for m in self.minibatches for d in m.stages[stage].staleness]
        return sum(vals) / len(vals) if vals else 0.0

    def mean_relative_distance(self, stage: int) -> float | None:
        """Mean over the mini-batches where it was measured; None if at none."""
        vals = [m.stages[stage].relative_distance for m in self.minibatches]
        return mean_known(vals) if vals else 0.0


def mean_known(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None (measured figures); None if there are none."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
