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
from timeprest.schedule.builders import Schedule
from timeprest.schedule.deps import walk_programs
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
    programs = schedule.programs
    pos = walk_programs(
        programs,
        schedule.num_microbatches,
        schedule.backward_unit,
        lambda s, i, a, _deps: runners[s].run(i, a, transport, batches),
    )
    if any(p < len(prog) for p, prog in zip(pos, programs)):
        raise ScheduleError("internal: the emulator deadlocked on a validated schedule")
    assert not transport.box, "messages left undelivered"
