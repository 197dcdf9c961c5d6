"""timeprest: pipeline-parallel training with explicit weight-version policies.

Implements V-TiMePReSt and I-TiMePReSt (Dutta, Chaki, De, 2025), their
predecessor TiMePReSt, and GPipe, 1F1B, PipeDream and PipeDream-2BW on one
engine. See docs/design.md for the semantics.
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
    "TimeprestError",
    "__version__",
    "build_schedule",
    "method_names",
]


def __getattr__(name: str):  # split lives with the front end and imports more
    if name == "split":
        from timeprest.splitting import split

        return split
    raise AttributeError(f"module 'timeprest' has no attribute {name!r}")
