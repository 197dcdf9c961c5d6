"""Replay per-stage programs under costs: the timeline a schedule produces.

Each stage runs its program in order; an action starts when the stage is
free and every dependency (from :func:`deps`) has ended, plus the
communication delay for a dependency on another stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from timeprest.errors import ScheduleError
from timeprest.schedule.actions import Action
from timeprest.schedule.costs import Costs
from timeprest.schedule.deps import BackwardUnit, deps, walk_programs


@dataclass(frozen=True)
class Slot:
    """One action placed on the time axis."""

    stage: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """The result of a replay: per stage, the slots in program order."""

    stages: tuple[tuple[Slot, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def makespan(self) -> float:
        return max((s.end for row in self.stages for s in row), default=0.0)

    def busy_time(self, stage: int) -> float:
        return sum(s.end - s.start for s in self.stages[stage])

    def bubble_fraction(self, stage: int) -> float:
        """Idle share of stage ``stage`` over the whole makespan."""
        span = self.makespan
        return 0.0 if span == 0 else 1.0 - self.busy_time(stage) / span

    def end_of(self, stage: int, action: Action) -> float:
        for slot in self.stages[stage]:
            if slot.action == action:
                return slot.end
        raise KeyError(f"{action} is not in the program of stage {stage}")


def replay(
    programs: Sequence[Sequence[Action]],
    costs: Costs,
    num_microbatches: int,
    backward_unit: BackwardUnit,
) -> Timeline:
    """Place each action of each program on the time axis.

    Raises :class:`ScheduleError` if the programs deadlock (no stage can make
    progress), naming the stuck actions.
    """
    timeline, stuck = replay_partial(programs, costs, num_microbatches, backward_unit)
    if stuck:
        raise ScheduleError(f"the programs deadlock: {stuck}")
    return timeline


def replay_partial(
    programs: Sequence[Sequence[Action]],
    costs: Costs,
    num_microbatches: int,
    backward_unit: BackwardUnit,
) -> tuple[Timeline, str]:
    """Like :func:`replay`, but returns what could run and a description of where it stuck."""
    w = len(programs)
    end: dict[tuple[int, Action], float] = {}
    free = [0.0] * w
    rows: list[list[Slot]] = [[] for _ in range(w)]

    def place(s: int, _index: int, a: Action, ds: list[tuple[int, Action]]) -> None:
        start = free[s]
        for d in ds:
            start = max(start, end[d] + costs.comm_delay(d[0], s))
        stop = start + costs.duration(s, a, num_microbatches)
        end[(s, a)] = stop
        free[s] = stop
        rows[s].append(Slot(s, a, start, stop))

    pos = walk_programs(programs, num_microbatches, backward_unit, place)
    stuck = [(s, programs[s][pos[s]]) for s in range(w) if pos[s] < len(programs[s])]
    if stuck:
        waits = "; ".join(
            f"stage {s} waits at {a} for "
            + ", ".join(
                f"{d[1]}@stage {d[0]}"
                for d in deps(s, a, w, num_microbatches, backward_unit)
                if d not in end
            )
            for s, a in stuck
        )
        return Timeline(tuple(tuple(r) for r in rows)), waits
    return Timeline(tuple(tuple(r) for r in rows)), ""
