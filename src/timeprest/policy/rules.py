"""Weight-version policies: which version each forward and each backward reads.

Policies are small frozen objects over integers; they never touch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from timeprest.errors import ConfigError

ForwardRule = Literal["live", "vertical", "previous"]
BackwardRule = Literal["stashed", "latest", "intermediate"]
GradRule = Literal["graph", "recompute"]
SignificanceKind = Literal["exp", "inverse", "callable"]

FORWARD_RULES: tuple[str, ...] = ("live", "vertical", "previous")
BACKWARD_RULES: tuple[str, ...] = ("stashed", "latest", "intermediate")
GRAD_RULES: tuple[str, ...] = ("graph", "recompute")
SIGNIFICANCE_KINDS: tuple[str, ...] = ("exp", "inverse")


@dataclass(frozen=True)
class Significance:
    """sigma(d): the weight of the stale (forward) version in the intermediate weights.

    ``exp``: ``exp(-decay * d)``; ``inverse``: ``1 / (1 + decay * d)``;
    ``callable``: ``fn(d)``, which must return a number in [0, 1].
    sigma(0) is 1 for every kind (at d = 0 both versions are the same), so
    ``decay=inf`` gives the latest weights and ``decay=0`` the stashed ones.
    """

    kind: SignificanceKind = "exp"
    decay: float = 1.0
    fn: Callable[[int], float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("exp", "inverse", "callable"):
            raise ConfigError(
                f"unknown significance {self.kind!r}: expected exp, inverse or a callable"
            )
        if self.kind == "callable" and self.fn is None:
            raise ConfigError("significance 'callable' needs fn")
        if not (self.decay >= 0):  # also rejects NaN
            raise ConfigError(f"decay (lambda) must be >= 0, got {self.decay}")

    def __call__(self, d: int) -> float:
        if d < 0:
            raise ValueError(f"degree of staleness must be >= 0, got {d}")
        if d == 0:
            return 1.0
        if self.kind == "exp":
            return math.exp(-self.decay * d)
        if self.kind == "inverse":
            return 0.0 if math.isinf(self.decay) else 1.0 / (1.0 + self.decay * d)
        assert self.fn is not None
        v = float(self.fn(d))
        if not (0.0 <= v <= 1.0):
            raise ConfigError(f"significance function returned {v} for d={d}: must be in [0, 1]")
        return v

    def describe(self) -> str:
        if self.kind == "callable":
            return f"callable {getattr(self.fn, '__name__', 'fn')}"
        return f"{self.kind} (lambda={self.decay:g})"


@dataclass(frozen=True)
class Policy:
    """Forward rule, backward rule, gradient rule and significance for the backward."""

    forward: ForwardRule = "live"
    backward: BackwardRule = "latest"
    grad_rule: GradRule = "graph"
    significance: Significance = Significance()

    def __post_init__(self) -> None:
        _check_choice("forward rule", self.forward, FORWARD_RULES)
        _check_choice("backward rule", self.backward, BACKWARD_RULES)
        _check_choice("gradient rule", self.grad_rule, GRAD_RULES)

    def backward_reads(self, v: int, k: int) -> tuple[int, ...]:
        """Versions the backward of a micro-batch with forward version v reads at version k."""
        if self.backward == "stashed" or v == k:
            return (v,)
        if self.backward == "latest":
            return (k,)
        sigma = self.significance(k - v)
        if sigma == 1.0:
            return (v,)
        if sigma == 0.0:
            return (k,)
        return (v, k)

    def needs_transient(self, v: int, k: int) -> bool:
        """True when the backward builds a new intermediate weight tensor."""
        return self.backward == "intermediate" and len(self.backward_reads(v, k)) == 2


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}: expected one of {', '.join(choices)}")


def make_significance(
    significance: str | Callable[[int], float] | Significance | None, decay: float | None
) -> Significance:
    if isinstance(significance, Significance):
        if decay is not None:
            return Significance(significance.kind, float(decay), significance.fn)
        return significance
    d = 1.0 if decay is None else float(decay)
    if significance is None:
        return Significance("exp", d)
    if callable(significance):
        return Significance("callable", d, significance)
    if significance not in SIGNIFICANCE_KINDS:
        raise ConfigError(
            f"unknown significance {significance!r}: expected exp, inverse or a callable"
        )
    return Significance(cast(SignificanceKind, significance), d)
