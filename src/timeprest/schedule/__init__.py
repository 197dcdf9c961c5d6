"""Schedules: actions, the dependency function, builders, validation and replay.

Pure Python; nothing here imports torch.
"""

from timeprest.schedule.actions import Action, B, F, U, format_program, parse, parse_program
from timeprest.schedule.builders import (
    SCHEDULE_KINDS,
    Schedule,
    backward_unit_of,
    build_schedule,
    schedule_from_programs,
    schedule_from_text,
)
from timeprest.schedule.costs import COST_MODES, Costs, resolve_costs
from timeprest.schedule.deps import deps, expected_actions
from timeprest.schedule.grid import format_grid, grid_cells
from timeprest.schedule.replay import Slot, Timeline, replay
from timeprest.schedule.validate import validate

__all__ = [
    "COST_MODES",
    "SCHEDULE_KINDS",
    "Action",
    "B",
    "Costs",
    "F",
    "Schedule",
    "Slot",
    "Timeline",
    "U",
    "backward_unit_of",
    "build_schedule",
    "deps",
    "expected_actions",
    "format_grid",
    "format_program",
    "grid_cells",
    "parse",
    "parse_program",
    "replay",
    "resolve_costs",
    "schedule_from_programs",
    "schedule_from_text",
    "validate",
]
