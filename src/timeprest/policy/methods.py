"""Method presets (docs/design.md section 6): a name for a schedule plus a policy."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypedDict, cast

from typing_extensions import Unpack

from timeprest.errors import ConfigError, MultipleSequenceWarning
from timeprest.policy.remedies import Correction, CorrectionKind, LrRule, LrRuleKind, Velocity
from timeprest.policy.rules import (
    BackwardRule,
    ForwardRule,
    GradRule,
    Policy,
    Significance,
    make_significance,
)
from timeprest.schedule.builders import (
    SCHEDULE_KINDS,
    check_schedule_size,
    has_multiple_sequences,
    multiple_sequence_message,
)


@dataclass(frozen=True)
class Method:
    """A named combination of schedule and policy."""

    name: str
    schedule: str
    policy: Policy
    default_microbatches: int | None = None
    summary: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gpipe", "gpipe", Policy("live", "latest"), summary="flush; synchronous SGD"),
        Method("1f1b", "1f1b", Policy("live", "latest"), summary="1F1B with flush; synchronous"),
        Method(
            "pipedream",
            "nf1b",
            Policy("live", "stashed"),
            default_microbatches=1,
            summary="async 1F1B, weight stashing",
        ),
        Method(
            "pipedream-2bw",
            "2bw",
            Policy("previous", "stashed"),
            summary="double-buffered weights, delay 1",
        ),
        Method(
            "timeprest",
            "nf1b",
            Policy("vertical", "latest"),
            summary="nF1B, vertical sync, latest-weight backward",
        ),
        Method(
            "v-timeprest",
            "nf1b",
            Policy("live", "latest"),
            summary="staleness-free: latest weights everywhere",
        ),
        Method(
            "i-timeprest",
            "nf1b",
            Policy("live", "intermediate"),
            summary="backward on weights between stale and latest",
        ),
        # the other remedies for staleness (docs/design.md section 12)
        Method(
            "weight-prediction",
            "nf1b",
            Policy("predicted", "latest"),
            summary="forward on weights predicted for the backward's version",
        ),
        Method(
            "pipemare",
            "nf1b",
            Policy("live", "velocity", lr_rule=LrRule("pipemare")),
            summary="velocity-extrapolated backward, delay-scaled learning rate",
        ),
        Method(
            "pipedream-lr",
            "nf1b",
            Policy("live", "stashed", lr_rule=LrRule("pipemare")),
            default_microbatches=1,
            summary="pipedream with PipeMare's learning rate",
        ),
        Method(
            "dc-asgd",
            "nf1b",
            Policy("live", "stashed", correction=Correction("dc")),
            default_microbatches=1,
            summary="pipedream with delay-compensated gradients",
        ),
        Method(
            "gap-aware",
            "nf1b",
            Policy("live", "stashed", correction=Correction("gap-aware")),
            default_microbatches=1,
            summary="pipedream with gap-penalised gradients",
        ),
        Method(
            "i-timeprest-velocity",
            "nf1b",
            Policy("live", "intermediate-velocity"),
            summary="I-TiMePReSt's weight from a velocity, without a stash",
        ),
    )
}


def method_names() -> list[str]:
    return list(METHODS)


DEFAULT_METHOD = "i-timeprest"
"""What ``timeprest train`` runs and ``timeprest profile`` times unless told otherwise."""


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}: expected one of {', '.join(METHODS)}"
        ) from None


class RemedyOverrides(TypedDict, total=False):
    """The remedy parameters that can be set one by one (docs/design.md section 12)."""

    correction: str | None
    lr_rule: str | None
    gamma: float | None
    dc_lambda: float | None
    gap_beta: float | None
    gap_eps: float | None
    pipemare_warmup: int | None


class Overrides(RemedyOverrides, total=False):
    """The parts of a method that can be set one by one (docs/design.md sections 6, 12)."""

    schedule: str | None
    forward: str | None
    backward: str | None
    grad_rule: str | None
    significance: str | Callable[[int], float] | Significance | None
    decay: float | None


def _remedies(p: Policy, o: RemedyOverrides) -> Policy:
    """The remedy parts of ``p`` (docs/design.md section 12) with the overrides applied."""
    vel, cor, lr = p.velocity, p.correction, p.lr_rule
    gamma, warmup = o.get("gamma"), o.get("pipemare_warmup")
    kind = o.get("correction") or cor.kind

    def num(name: str) -> float:
        value = o.get(name)
        return float(getattr(cor, name) if value is None else value)  # type: ignore[arg-type]

    return replace(
        p,
        velocity=Velocity(float(gamma)) if gamma is not None else vel,
        correction=Correction(
            cast(CorrectionKind, kind), num("dc_lambda"), num("gap_beta"), num("gap_eps")
        ),
        lr_rule=LrRule(
            cast(LrRuleKind, o.get("lr_rule") or lr.kind),
            warmup if warmup is not None else lr.warmup,
        ),
    )


def resolve_policy(method: str, **overrides: Unpack[Overrides]) -> tuple[str, Policy]:
    """The schedule kind and policy of ``method`` with the given overrides applied."""
    m = get_method(method)
    schedule = overrides.get("schedule")
    forward, backward = overrides.get("forward"), overrides.get("backward")
    grad_rule, significance = overrides.get("grad_rule"), overrides.get("significance")
    decay = overrides.get("decay")
    if schedule is not None and schedule not in SCHEDULE_KINDS:
        raise ConfigError(
            f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULE_KINDS)}"
        )
    p = m.policy
    sig = make_significance(
        significance if significance is not None else p.significance,
        decay,
    )
    p = replace(
        p,
        forward=cast(ForwardRule, forward or p.forward),
        backward=cast(BackwardRule, backward or p.backward),
        grad_rule=cast(GradRule, grad_rule or p.grad_rule),
        significance=sig,
    )
    return schedule or m.schedule, _remedies(p, overrides)


def warn_multiple_sequence(
    method: str, schedule: str, num_stages: int, num_microbatches: int, *, stacklevel: int = 3
) -> None:
    """Warn when an nF1B method runs with N < W-1 (TiMePReSt's multiple-sequence problem).

    PipeDream and the methods built on it are exempt: whole mini-batches (N = 1)
    are their own design.
    """
    exempt = get_method(method).default_microbatches == 1
    if not exempt and has_multiple_sequences(schedule, num_stages, num_microbatches):
        warnings.warn(
            f"{method}: {multiple_sequence_message(num_stages, num_microbatches)}",
            MultipleSequenceWarning,
            stacklevel=stacklevel,
        )


def default_microbatches(method: str, num_stages: int) -> int:
    """N when none is given: the method's own (PipeDream: 1), else W."""
    return get_method(method).default_microbatches or num_stages


@dataclass(frozen=True)
class Resolved:
    """A method with its overrides applied and every constraint checked, for W stages."""

    method: Method
    schedule: str
    policy: Policy
    num_stages: int
    num_microbatches: int


def resolve(
    method: str,
    num_stages: int,
    num_microbatches: int | None = None,
    *,
    warn: bool = True,
    stacklevel: int = 3,
    **overrides: Unpack[Overrides],
) -> Resolved:
    """The one place that turns (method, W, N, overrides) into a checked configuration.

    ``Pipeline``, ``timeprest train``, ``schedule``, ``profile``, ``simulate`` and
    ``compare`` all call it, so they resolve the same N and the same schedule for the
    same flags. Raises :class:`ConfigError` for a bad combination; warns (when ``warn``)
    about the multiple-sequence problem.
    """
    m = get_method(method)
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ConfigError(f"the number of stages must be an integer >= 1, got {num_stages!r}")
    kind, pol = resolve_policy(method, **overrides)
    n = default_microbatches(method, num_stages) if num_microbatches is None else num_microbatches
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"num_microbatches must be an integer >= 1, got {n!r}")
    check_schedule_size(kind, num_stages, n)
    if pol.forward == "previous" and kind != "2bw":
        raise ConfigError("forward rule 'previous' needs the 2bw schedule (version t-1 must exist)")
    if warn:
        warn_multiple_sequence(m.name, kind, num_stages, n, stacklevel=stacklevel + 1)
    return Resolved(m, kind, pol, num_stages, n)
