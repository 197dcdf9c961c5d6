"""The other remedies for weight staleness as policy parts (docs/design.md section 12).

Each part is a small frozen object over numbers, settable on its own, like the
forward and backward rules; the tensor side is :mod:`timeprest.stage.remedies`.
The degree of staleness ``d`` every part uses comes from the version plan
(:mod:`timeprest.policy.plan`), never from a formula in W and s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from timeprest.errors import ConfigError

CorrectionKind = Literal["none", "dc", "gap-aware"]
LrRuleKind = Literal["constant", "pipemare"]
CORRECTIONS: tuple[str, ...] = ("none", "dc", "gap-aware")
LR_RULES: tuple[str, ...] = ("constant", "pipemare")

DEFAULT_GAMMA = 0.9
"""Decay of the weight-velocity average (not taken from PipeMare: see docs/design.md 12)."""
DEFAULT_DC_LAMBDA = 0.04
"""DC-ASGD's constant variance-control lambda (the default of MXNet's DCASGD optimizer)."""
DEFAULT_GAP_BETA = 0.999
"""Decay of Gap-Aware's average of squared steps (FTPipe's SGD default: docs/design.md 12)."""
DEFAULT_GAP_EPS = 1e-8
"""Added to C's root so that C is never 0 (FTPipe's SGD default: docs/design.md 12)."""
DEFAULT_WARMUP = 1000
"""K of PipeMare's learning-rate rule: updates until the rescaling has faded out (not
taken from PipeMare: see docs/design.md section 12)."""


def _check_range(what: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):  # also rejects NaN
        raise ConfigError(f"{what} must be in [{low:g}, {high:g}], got {value}")


@dataclass(frozen=True)
class Velocity:
    """``delta <- gamma * delta + (1 - gamma) * (w_new - w_old)`` after every update.

    gamma = 1 keeps delta at 0 (the backward then reads the latest weights).
    """

    gamma: float = DEFAULT_GAMMA

    def __post_init__(self) -> None:
        _check_range("gamma (the velocity decay)", self.gamma, 0.0, 1.0)


@dataclass(frozen=True)
class Correction:
    """A correction of a stale gradient before ``U`` (needs the forward's version).

    ``dc``: ``g + dc_lambda * g * g * (w_k - w_v)`` (DC-ASGD).
    ``gap-aware``: ``g / (1 + |w_k - w_v| / C)`` (Gap-Aware), C per element the
    typical step ``eta_max * (sqrt(r / (1 - gap_beta**n)) + gap_eps)``: r the
    running average (decay ``gap_beta``) of the squared direction the optimizer
    stepped along over its n updates, eta_max the largest learning rate used.
    ``gap_eps = inf`` makes C infinite: no correction.
    """

    kind: CorrectionKind = "none"
    dc_lambda: float = DEFAULT_DC_LAMBDA
    gap_beta: float = DEFAULT_GAP_BETA
    gap_eps: float = DEFAULT_GAP_EPS

    def __post_init__(self) -> None:
        if self.kind not in CORRECTIONS:
            raise ConfigError(
                f"unknown gradient correction {self.kind!r}: expected one of "
                f"{', '.join(CORRECTIONS)}"
            )
        if not (self.dc_lambda >= 0):
            raise ConfigError(f"dc_lambda must be >= 0, got {self.dc_lambda}")
        _check_range("gap_beta", self.gap_beta, 0.0, 1.0 - 1e-12)
        if not (self.gap_eps > 0):
            raise ConfigError(f"gap_eps must be > 0, got {self.gap_eps}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @property
    def buffers(self) -> int:
        """Weight-sized tensors the correction keeps between updates (C's running average)."""
        return 1 if self.kind == "gap-aware" else 0


@dataclass(frozen=True)
class LrRule:
    """The learning rate of stage s's update of mini-batch t, as a factor of the optimizer's.

    ``pipemare``: ``1 / tau ** p(t)``, ``p(t) = 1 - min(t / warmup, 1)``, ``tau`` the
    mean degree of staleness of the mini-batch's micro-batches at s (at least 1).
    """

    kind: LrRuleKind = "constant"
    warmup: int = DEFAULT_WARMUP

    def __post_init__(self) -> None:
        if self.kind not in LR_RULES:
            raise ConfigError(
                f"unknown learning-rate rule {self.kind!r}: expected one of {', '.join(LR_RULES)}"
            )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise ConfigError(f"warmup (K) must be an integer >= 1, got {self.warmup!r}")

    def factor(self, t: int, mean_staleness: float) -> float:
        if self.kind == "constant":
            return 1.0
        tau = max(1.0, mean_staleness)
        p = 1.0 - min(t / self.warmup, 1.0)
        return 1.0 / math.pow(tau, p)
