"""Method presets (DESIGN section 6): a name for a schedule plus a policy."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

from timeprest.errors import ConfigError, MultipleSequenceWarning
from timeprest.policy.rules import (
    BackwardRule,
    ForwardRule,
    GradRule,
    Policy,
    Significance,
    make_significance,
)
from timeprest.schedule.builders import SCHEDULE_KINDS, multiple_sequence_message


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


def resolve_policy(
    method: str,
    *,
    schedule: str | None = None,
    forward: str | None = None,
    backward: str | None = None,
    grad_rule: str | None = None,
    significance: str | Callable[[int], float] | Significance | None = None,
    decay: float | None = None,
) -> tuple[str, Policy]:
    """The schedule kind and policy of ``method`` with the given overrides applied."""
    m = get_method(method)
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
    return schedule or m.schedule, p


def warn_multiple_sequence(
    method: str, schedule: str, num_stages: int, num_microbatches: int, *, stacklevel: int = 3
) -> None:
    """Warn when an nF1B method runs with N < W-1 (TiMePReSt's multiple-sequence problem).

    PipeDream is exempt: whole mini-batches (N = 1) are its own design.
    """
    if schedule == "nf1b" and num_microbatches < num_stages - 1 and method != "pipedream":
        warnings.warn(
            f"{method}: {multiple_sequence_message(num_stages, num_microbatches)}",
            MultipleSequenceWarning,
            stacklevel=stacklevel,
        )
