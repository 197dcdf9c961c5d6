"""The emulator: every stage in one process, exact numerics.

Each stage executes its lowered program (:mod:`timeprest.schedule.lower`)
through :class:`StageExecutor`, as far as its messages have arrived; then the
next stage gets its turn, round after round. Results depend only on each
stage's program order, never on this interleaving, which is why the runtime
gives the same bits.

The transport is a checking mailbox (:mod:`timeprest.engine.mailbox`): a
program whose receive order differs from its neighbour's send order fails
with the stage, the action and both messages named.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from timeprest.engine.allocator import keep_freed_memory
from timeprest.engine.executor import StageExecutor
from timeprest.engine.mailbox import CheckingMailbox, drive
from timeprest.engine.protocol import Job, Outcome, StageSpec
from timeprest.errors import ConfigError
from timeprest.schedule.lower import Lowered
from timeprest.stage import Batches, StageRunner, StreamedBatches

T = TypeVar("T")


def run_emulated(lowered: Lowered, runners: Sequence[StageRunner], batches: Batches) -> None:
    """Run every stage's lowered program to the end in one process."""
    mailbox = CheckingMailbox(lowered.schedule.backward_unit)
    drive(
        [StageExecutor(ops, r, mailbox, batches) for ops, r in zip(lowered.programs, runners)],
        [mailbox],
    )


class Emulator:
    """The engine of ``Pipeline(engine="emulate")``: every stage in this process.

    The batches are streamed (docs/design.md section 13): with a known count
    (``len()`` or the caller's), mini-batch t is read when stage 0 first needs it
    and dropped after its last use; an iterable of unknown length is read into a
    list first, since the schedule needs the number of mini-batches.
    """

    name = "emulate"

    def build_stages(self, stages: StageSpec, num_stages: int | None) -> list[nn.Module | None]:
        """Every stage: the list given, or ``stage_fn`` called per stage."""
        if isinstance(stages, nn.Module) or not (callable(stages) or isinstance(stages, Sequence)):
            raise ConfigError(
                "stages must be a list of nn.Module, one per stage, or a callable stage_fn(stage) "
                "-> nn.Module (use timeprest.split(model, num_stages) to cut a model)"
            )
        if callable(stages):
            if num_stages is None:
                raise ConfigError("with a stage_fn callable, give num_stages too")
            built: list[Any] = [stages(s) for s in range(num_stages)]
        else:
            built = list(stages)
            if num_stages is not None and num_stages != len(built):
                raise ConfigError(f"num_stages={num_stages} but {len(built)} stages were given")
        if len(built) == 0:
            raise ConfigError("the stage list is empty: give at least one nn.Module")
        for i, m in enumerate(built):
            if not isinstance(m, nn.Module):
                raise ConfigError(f"stage {i} is a {type(m).__name__}, not an nn.Module")
        return built

    def agreed(self, what: str, fn: Callable[[], T]) -> T:
        return fn()

    def gather_stages(self, values: list[Any], what: str) -> list[Any]:
        return list(values)  # every stage's runner is here

    def run(self, job: Job) -> Outcome:
        keep_freed_memory()  # weight-sized tensors come and go at every micro-batch
        if job.replicas:  # data parallel: docs/design.md section 10
            from timeprest.engine.replicas import run_replicas

            return run_replicas(job)
        batches, count = job.counted()
        runners = job.runners
        if count == 0:
            return Outcome([], [{} for _ in runners], [r.report() for r in runners])
        lowered, plans = job.plan(count)
        source = StreamedBatches(batches, job.num_microbatches, count, job.check)
        for r, plan in zip(runners, plans):
            r.begin(plan, job.base_minibatch)
        runners[-1].on_loss = job.on_loss
        try:
            run_emulated(lowered, runners, source)
        finally:
            runners[-1].on_loss = None
        losses = [runners[-1].losses[t] for t in range(count)]
        return Outcome(losses, [r.steps for r in runners], [r.report() for r in runners])
