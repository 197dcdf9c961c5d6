"""Checks that per-stage programs form a complete, runnable schedule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from timeprest.errors import ScheduleError
from timeprest.schedule.actions import Action, format_program
from timeprest.schedule.costs import Costs
from timeprest.schedule.deps import BackwardUnit, deps, expected_actions
from timeprest.schedule.grid import format_grid
from timeprest.schedule.replay import replay_partial


def format_programs(programs: Sequence[Sequence[Action]]) -> str:
    return "\n".join(f"stage {s} | {format_program(list(p))}" for s, p in enumerate(programs))


def validate(
    programs: Sequence[Sequence[Action]],
    num_stages: int,
    num_microbatches: int,
    num_minibatches: int,
    backward_unit: BackwardUnit,
) -> None:
    """Raise :class:`ScheduleError` unless the programs are a valid schedule.

    Valid means: one program per stage; each holds every forward, backward and
    update of its stage exactly once and nothing else; every same-stage
    dependency comes earlier in program order (a backward after its forwards,
    ``U{t}`` after the last backward of mini-batch ``t``); and the stages,
    each running its program in order, cannot deadlock.
    """
    if len(programs) != num_stages:
        raise ScheduleError(f"{len(programs)} programs for {num_stages} stages: need one per stage")
    for s, prog in enumerate(programs):
        want = Counter(expected_actions(s, num_microbatches, num_minibatches, backward_unit))
        have = Counter(prog)
        for a, n in have.items():
            if a not in want:
                raise ScheduleError(
                    f"stage {s}: unexpected action {a} (backward unit: {backward_unit}, "
                    f"N={num_microbatches}, T={num_minibatches})\n{format_programs(programs)}"
                )
            if n > 1:
                raise ScheduleError(
                    f"stage {s}: action {a} appears {n} times\n{format_programs(programs)}"
                )
        missing = [a for a in want if a not in have]
        if missing:
            raise ScheduleError(
                f"stage {s}: missing action {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"\n{format_programs(programs)}"
            )
        seen: set[Action] = set()
        for a in prog:
            for ds, da in deps(s, a, num_stages, num_microbatches, backward_unit):
                if ds == s and da not in seen:
                    raise ScheduleError(
                        f"stage {s}: {a} comes before {da}, which it needs\n"
                        f"{format_programs(programs)}"
                    )
            seen.add(a)
    timeline, stuck = replay_partial(
        programs, Costs.uniform(num_stages, 1.0, 1.0), num_microbatches, backward_unit
    )
    if stuck:
        raise ScheduleError(f"the programs deadlock: {stuck}\n{format_grid(timeline)}")
