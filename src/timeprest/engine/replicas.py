"""The emulator with D data-parallel replicas of the pipeline (docs/design.md section 10).

Every replica runs the same lowered programs on its own runners, with its own
checking mailbox and its own part of each mini-batch. The replicas meet only
at updates: a copy of stage s may start ``U{t}`` once every copy of stage s has
reached it, and the first to go combines all their gradients
(:class:`~timeprest.stage.replicas.EmulatedReduction`), in replica order, as
the distributed runtime's all-gather does. The reported loss of a mini-batch
is the row-weighted combination of the replicas' losses; the per-stage
figures are replica 0's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from timeprest.engine.executor import StageExecutor, Transport
from timeprest.engine.mailbox import CheckingMailbox, drive
from timeprest.engine.protocol import Job, Outcome
from timeprest.schedule.lower import Lowered, Op
from timeprest.stage import Minibatch, StageRunner, StreamedBatches
from timeprest.stage.replicas import (
    EmulatedReduction,
    Fanout,
    Grads,
    combine_losses,
    part_weights,
)


class _GatedMailbox:
    """A replica's mailbox that also holds each update until every copy of its stage is there."""

    def __init__(self, mailbox: Transport, copies: list[StageExecutor], mine: int) -> None:
        self.mailbox = mailbox
        self.copies = copies  # the executors of this stage, one per replica
        self.mine = mine

    def ready(self, op: Op) -> bool:
        if op.op == "run" and op.action.kind == "U":
            here = self.copies[self.mine].pos
            return all(c.pos >= here for c in self.copies)
        return self.mailbox.ready(op)

    @property
    def waited(self) -> float:
        return self.mailbox.waited

    def recv(self, op: Op) -> Tensor:
        return self.mailbox.recv(op)

    def send(self, op: Op, tensor: Tensor) -> None:
        self.mailbox.send(op, tensor)

    def progress(self) -> None:
        pass


def _reader(runner: StageRunner) -> Callable[[], Grads]:
    return lambda: runner.accumulated_grads


def _as_checked(t: int, batch: object) -> Minibatch:
    return batch  # type: ignore[return-value]  # the fan-out checked the whole mini-batch


def run_lockstep(
    lowered: Lowered, copies: Sequence[Sequence[StageRunner]], sources: Sequence[StreamedBatches]
) -> None:
    """Run the programs of every replica to the end, updates held for the slowest copy."""
    w = len(lowered.programs)
    grid: list[list[StageExecutor]] = [[] for _ in range(w)]  # per stage: one per replica
    executors: list[StageExecutor] = []
    mailboxes: list[CheckingMailbox] = []
    for r, (runners, source) in enumerate(zip(copies, sources)):
        mailbox = CheckingMailbox(lowered.schedule.backward_unit)
        mailboxes.append(mailbox)
        for s, (ops, runner) in enumerate(zip(lowered.programs, runners)):
            ex = StageExecutor(ops, runner, _GatedMailbox(mailbox, grid[s], r), source)
            grid[s].append(ex)
            executors.append(ex)
    drive(executors, mailboxes)


def run_replicas(job: Job) -> Outcome:
    """The emulator's :meth:`run` for ``D = 1 + len(job.replicas)`` replicas."""
    copies = [list(job.runners), *[list(rs) for rs in job.replicas]]
    d = len(copies)
    batches, count = job.counted()
    if count == 0:
        return Outcome([], [{} for _ in job.runners], [r.report() for r in job.runners])
    lowered, plans = job.plan(count)
    fan = Fanout(batches, d, job.check)
    n = job.num_microbatches
    sources = [StreamedBatches(fan.stream(r), n, count, _as_checked) for r in range(d)]

    def weights(t: int) -> list[float]:
        return part_weights(fan.rows[t], d)

    for s in range(len(job.runners)):
        stage = [c[s] for c in copies]
        reduction = EmulatedReduction([_reader(rn) for rn in stage], weights)
        for r, runner in enumerate(stage):
            runner.begin(plans[s], job.base_minibatch)
            runner.combine_grads = reduction.hook(r)
    pending: dict[int, dict[int, float]] = {}

    def collector(r: int):  # type: ignore[no-untyped-def]
        def on_loss(t_global: int, loss: float) -> None:
            got = pending.setdefault(t_global, {})
            got[r] = loss
            if len(got) == d and job.on_loss is not None:
                del pending[t_global]
                losses = [got[q] for q in range(d)]
                job.on_loss(
                    t_global, combine_losses(losses, weights(t_global - job.base_minibatch))
                )

        return on_loss

    for r, c in enumerate(copies):
        c[-1].on_loss = collector(r)
    try:
        run_lockstep(lowered, copies, sources)
    finally:
        for c in copies:
            c[-1].on_loss = None
            for runner in c:
                runner.combine_grads = None
    losses = [combine_losses([c[-1].losses[t] for c in copies], weights(t)) for t in range(count)]
    return Outcome(losses, [r.steps for r in job.runners], [r.report() for r in job.runners])
