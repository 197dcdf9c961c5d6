"""The single source of truth for data flow between actions.

``deps(stage, action, ...)`` lists the actions (with their stages) that must
have finished before ``action`` may start at ``stage``. The validator, the
replay, the list rule, the simulator, the emulator and the runtime all ask
this function; none of them encodes the dependencies on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from timeprest.schedule.actions import Action

BackwardUnit = Literal["minibatch", "microbatch"]

Dep = tuple[int, Action]


def deps(
    stage: int,
    action: Action,
    num_stages: int,
    num_microbatches: int,
    backward_unit: BackwardUnit,
) -> list[Dep]:
    """Actions that must be done before ``action`` runs at ``stage``.

    - ``F{t}.{j}`` needs ``F{t}.{j}`` at the previous stage (nothing at stage 0).
    - ``B{t}`` needs every ``F{t}.*`` at this stage and ``B{t}`` at the next
      stage (at the last stage only the forwards).
    - ``B{t}.{j}`` needs ``F{t}.{j}`` here and ``B{t}.{j}`` at the next stage.
    - ``U{t}`` needs every backward of mini-batch ``t`` at this stage.
    """
    t, j = action.minibatch, action.microbatch
    last = num_stages - 1
    if action.kind == "F":
        return [] if stage == 0 else [(stage - 1, action)]
    if action.kind == "B":
        if j is None:
            out: list[Dep] = [(stage, Action("F", t, i)) for i in range(num_microbatches)]
        else:
            out = [(stage, Action("F", t, j))]
        if stage < last:
            out.append((stage + 1, action))
        return out
    # update
    if backward_unit == "minibatch":
        return [(stage, Action("B", t))]
    return [(stage, Action("B", t, i)) for i in range(num_microbatches)]


def expected_actions(
    stage: int, num_microbatches: int, num_minibatches: int, backward_unit: BackwardUnit
) -> list[Action]:
    """Every action a complete program of one stage contains, in canonical order."""
    out: list[Action] = []
    for t in range(num_minibatches):
        out.extend(Action("F", t, j) for j in range(num_microbatches))
        if backward_unit == "minibatch":
            out.append(Action("B", t))
        else:
            out.extend(Action("B", t, j) for j in range(num_microbatches))
        out.append(Action("U", t))
    return out


def walk_programs(
    programs: Sequence[Sequence[Action]],
    num_microbatches: int,
    backward_unit: BackwardUnit,
    step: Callable[[int, int, Action, list[Dep]], None],
) -> list[int]:
    """Run each stage's program in order, each as far as its dependencies allow, until stuck.

    ``step(stage, index, action, deps)`` is called for every action once all
    its dependencies have been stepped. Returns how far each program got (a
    position short of its length means a deadlock). Results of a valid
    schedule depend only on each stage's program order, never on this
    interleaving, so every engine may walk this way.
    """
    w = len(programs)
    pos = [0] * w
    done: set[Dep] = set()
    progress = True
    while progress:
        progress = False
        for s in range(w):
            prog = programs[s]
            while pos[s] < len(prog):
                a = prog[pos[s]]
                ds = deps(s, a, w, num_microbatches, backward_unit)
                if any(d not in done for d in ds):
                    break
                step(s, pos[s], a, ds)
                done.add((s, a))
                pos[s] += 1
                progress = True
    return pos
