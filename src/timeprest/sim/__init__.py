"""The simulator: a cost model replays a schedule to predict time, bubbles, memory and staleness.

No tensors here (torch is only imported by :mod:`timeprest.sim.profile`, and
matplotlib only by :mod:`timeprest.sim.gantt`, both when used).
"""

from timeprest.sim.costmodel import FORMAT_VERSION, CostModel, StageCost
from timeprest.sim.memory import MemoryTimeline, memory_timelines
from timeprest.sim.simulate import (
    ORDER_COSTS,
    SimResult,
    StageResult,
    SteadyState,
    format_text,
    simulate,
    simulate_schedule,
    steady_state,
)
from timeprest.sim.trace import chrome_trace, write_chrome_trace

__all__ = [
    "FORMAT_VERSION",
    "ORDER_COSTS",
    "CostModel",
    "MemoryTimeline",
    "SimResult",
    "StageCost",
    "StageResult",
    "SteadyState",
    "chrome_trace",
    "format_text",
    "memory_timelines",
    "simulate",
    "simulate_schedule",
    "steady_state",
    "write_chrome_trace",
]
