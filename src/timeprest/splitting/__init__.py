"""Cutting a model into pipeline stages (``timeprest.split`` is the function, this the package)."""

from timeprest.splitting.partition import (
    Balance,
    LayerTiming,
    SplitPlan,
    apply_plan,
    balanced_partition,
    pipeline_layers,
    plan_split,
    profile_layers,
    split,
)

__all__ = [
    "Balance",
    "LayerTiming",
    "SplitPlan",
    "apply_plan",
    "balanced_partition",
    "pipeline_layers",
    "plan_split",
    "profile_layers",
    "split",
]
