"""Weight-version policies: which version each forward and each backward reads.

Policies are small frozen objects over integers; they never touch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from timeprest.errors import ConfigError
from timeprest.policy.remedies import Correction, LrRule, Velocity

ForwardRule = Literal["live", "vertical", "previous", "predicted"]
BackwardRule = Literal["stashed", "latest", "intermediate", "velocity", "intermediate-velocity"]
GradRule = Literal["graph", "recompute"]
SignificanceKind = Literal["exp", "inverse", "callable"]

FORWARD_RULES: tuple[str, ...] = ("live", "vertical", "previous", "predicted")
BACKWARD_RULES: tuple[str, ...] = (
    "stashed",
    "latest",
    "intermediate",
    "velocity",
    "intermediate-velocity",
)
VELOCITY_RULES: tuple[str, ...] = ("velocity", "intermediate-velocity")
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
    """Forward rule, backward rule, gradient rule and significance for the backward.

    ``velocity``, ``correction`` and ``lr_rule`` are the remedies of docs/design.md
    section 12 (the velocity's gamma only matters for the velocity backward rules).
    ``predicted`` forwards read the live version (plus the optimizer's state).
    """

    forward: ForwardRule = "live"
    backward: BackwardRule = "latest"
    grad_rule: GradRule = "graph"
    significance: Significance = Significance()
    velocity: Velocity = Velocity()
    correction: Correction = Correction()
    lr_rule: LrRule = LrRule()

    def __post_init__(self) -> None:
        _check_choice("forward rule", self.forward, FORWARD_RULES)
        _check_choice("backward rule", self.backward, BACKWARD_RULES)
        _check_choice("gradient rule", self.grad_rule, GRAD_RULES)

    def backward_reads(self, v: int, k: int) -> tuple[int, ...]:
        """Versions the backward of a micro-batch with forward version v reads at version k.

        A gradient correction also reads both (it needs ``w_k - w_v``).
        """
        reads = self.weight_reads(v, k)
        if self.correction.active and v != k:
            return (v, k)
        return reads

    def weight_reads(self, v: int, k: int) -> tuple[int, ...]:
        """Versions the backward weights are built from (without a correction's reads)."""
        if self.backward == "stashed" or v == k:
            return (v,)
        if self.backward in ("latest", *VELOCITY_RULES):
            return (k,)
        sigma = self.significance(k - v)
        if sigma == 1.0:
            return (v,)
        if sigma == 0.0:
            return (k,)
        return (v, k)

    def velocity_scale(self, d: int) -> float:
        """c in the backward weights ``w_k - c * delta`` of the velocity rules (0: none)."""
        if self.backward == "velocity":
            return float(d)
        if self.backward == "intermediate-velocity":
            return self.significance(d) * d if d > 0 else 0.0
        return 0.0

    def needs_transient(self, v: int, k: int) -> bool:
        """True when the backward builds a new weight tensor (intermediate or extrapolated)."""
        if self.backward in VELOCITY_RULES:
            return self.velocity_scale(k - v) != 0.0
        return self.backward == "intermediate" and len(self.weight_reads(v, k)) == 2

    @property
    def extra_buffers(self) -> int:
        """Weight-sized tensors a stage keeps between updates beside its versions.

        One velocity ``delta`` for the velocity rules, one running average for
        ``gap-aware``; the optimizer's own state is not counted here.
        """
        return int(self.backward in VELOCITY_RULES) + self.correction.buffers

    @property
    def uses_remedies(self) -> bool:
        return (
            self.forward == "predicted"
            or self.backward in VELOCITY_RULES
            or self.correction.active
            or self.lr_rule.kind != "constant"
        )

    def describe_remedies(self) -> dict[str, object]:
        """The remedy settings for logs and checkpoints; empty when the policy uses none.

        (Empty for the methods of docs/design.md section 6, so their descriptions and
        checkpoint hashes stay what they were.)
        """
        if not self.uses_remedies:
            return {}
        cor, lr = self.correction, self.lr_rule
        return {
            "gamma": self.velocity.gamma,
            "correction": cor.kind,
            "dc_lambda": cor.dc_lambda,
            "gap_beta": cor.gap_beta,
            "gap_eps": cor.gap_eps,
            "lr_rule": lr.kind,
            "pipemare_warmup": lr.warmup,
        }


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
