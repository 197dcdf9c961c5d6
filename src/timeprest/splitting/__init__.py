"""Cutting a model into pipeline stages (``timeprest.split`` is the function, this the package).

``layers``: what a model's layers are; ``profile``: timing them;
``partition``: choosing the stages (:class:`SplitPlan`) and building them;
``ties``: building them with one copy per stage of a tensor several stages use.
"""

from timeprest.splitting.layers import layer_paths, pipeline_layers
from timeprest.splitting.partition import (
    Balance,
    SplitPlan,
    apply_plan,
    balanced_partition,
    plan_split,
    split,
)
from timeprest.splitting.profile import LayerTiming, profile_layers, sample_input_for
from timeprest.splitting.ties import apply_plan_untied

__all__ = [
    "Balance",
    "LayerTiming",
    "SplitPlan",
    "apply_plan",
    "apply_plan_untied",
    "balanced_partition",
    "layer_paths",
    "pipeline_layers",
    "plan_split",
    "profile_layers",
    "sample_input_for",
    "split",
]
