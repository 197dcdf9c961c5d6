"""The emulator: every stage in one process, exact numerics.

Each stage runs its program in order; a stage proceeds as far as its
dependencies (from :func:`timeprest.schedule.deps`) allow, then the next
stage gets its turn. Results depend only on each stage's program order, never
on this interleaving, which is why the runtime gives the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from timeprest.errors import ScheduleError
from timeprest.schedule.actions import Action
from timeprest.schedule.builders import Schedule
from timeprest.stage import Batches, StageRunner


class MailboxTransport:
    """In-process transport: a dictionary of messages keyed by (kind, receiver, t, j)."""

    def __init__(self) -> None:
        self.box: dict[tuple[str, int, int, int], Tensor] = {}

    def send_activation(self, stage: int, t: int, j: int, x: Tensor) -> None:
        self.box[("act", stage + 1, t, j)] = x

    def recv_activation(self, stage: int, t: int, j: int) -> Tensor:
        return self.box.pop(("act", stage, t, j))

    def send_grad(self, stage: int, t: int, j: int, g: Tensor) -> None:
        self.box[("grad", stage - 1, t, j)] = g

    def recv_grad(self, stage: int, t: int, j: int) -> Tensor:
        return self.box.pop(("grad", stage, t, j))


def run_emulated(schedule: Schedule, runners: Sequence[StageRunner], batches: Batches) -> None:
    """Run every stage's program to the end in one process."""
    transport = MailboxTransport()
    w = schedule.num_stages
    pos = [0] * w
    done: set[tuple[int, Action]] = set()
    programs = schedule.programs
    progress = True
    while progress:
        progress = False
        for s in range(w):
            prog = programs[s]
            while pos[s] < len(prog):
                a = prog[pos[s]]
                if any(d not in done for d in schedule.deps(s, a)):
                    break
                runners[s].run(pos[s], a, transport, batches)
                done.add((s, a))
                pos[s] += 1
                progress = True
    if any(pos[s] < len(programs[s]) for s in range(w)):
        raise ScheduleError("internal: the emulator deadlocked on a validated schedule")
    assert not transport.box, "messages left undelivered"
