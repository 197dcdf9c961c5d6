"""Weight-version policies, method presets and the version plan (integers, no tensors)."""

from timeprest.policy.methods import (
    DEFAULT_METHOD,
    METHODS,
    Method,
    Resolved,
    default_microbatches,
    get_method,
    method_names,
    resolve,
    resolve_policy,
    warn_multiple_sequence,
)
from timeprest.policy.plan import StagePlan, plan_versions
from timeprest.policy.rules import (
    BACKWARD_RULES,
    FORWARD_RULES,
    GRAD_RULES,
    Policy,
    Significance,
    make_significance,
)

__all__ = [
    "BACKWARD_RULES",
    "FORWARD_RULES",
    "GRAD_RULES",
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "Resolved",
    "Policy",
    "Significance",
    "StagePlan",
    "default_microbatches",
    "get_method",
    "make_significance",
    "method_names",
    "plan_versions",
    "resolve",
    "resolve_policy",
    "warn_multiple_sequence",
]
