"""timeprest: pipeline-parallel training with explicit weight-version policies.

Implements V-TiMePReSt and I-TiMePReSt (Dutta, Chaki, De, 2025), their
predecessor TiMePReSt, and GPipe, 1F1B, PipeDream and PipeDream-2BW on one
engine. See docs/design.md for the semantics.

``timeprest.split`` is the function that cuts a model into stages; the
package holding it is ``timeprest.splitting`` (no submodule is named
``split``, so importing submodules never replaces the function).
"""

from timeprest._version import __version__
from timeprest.errors import (
    ConfigError,
    DataError,
    MultipleSequenceWarning,
    NonFiniteLossError,
    ScheduleError,
    ShapeError,
    TimeprestError,
)
from timeprest.pipeline import Pipeline
from timeprest.policy import METHODS, Policy, Significance, method_names
from timeprest.report import Report
from timeprest.schedule import Action, Costs, Schedule, build_schedule
from timeprest.splitting import SplitPlan, plan_split, split

__all__ = [
    "METHODS",
    "Action",
    "ConfigError",
    "Costs",
    "DataError",
    "MultipleSequenceWarning",
    "NonFiniteLossError",
    "Pipeline",
    "Policy",
    "Report",
    "Schedule",
    "ScheduleError",
    "ShapeError",
    "Significance",
    "SplitPlan",
    "TimeprestError",
    "__version__",
    "build_schedule",
    "method_names",
    "plan_split",
    "split",
]
