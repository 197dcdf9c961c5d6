"""The emulator: every stage in one process, exact numerics.

Each stage executes its lowered program (:mod:`timeprest.schedule.lower`)
through :class:`StageExecutor`, as far as its messages have arrived; then the
next stage gets its turn, round after round. Results depend only on each
stage's program order, never on this interleaving, which is why the runtime
gives the same bits.

The transport is a checking mailbox: one first-in first-out queue per
channel (sender, receiver, kind). A receive must find exactly the message its
program expects at the head of the queue, so a program whose receive order
differs from its neighbour's send order fails here with the stage, the
action and both messages named, just as it would hang or mismatch on a real
transport.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn

from timeprest.engine.executor import StageExecutor
from timeprest.engine.protocol import Job, Outcome, StageSpec
from timeprest.errors import ConfigError, ScheduleError
from timeprest.schedule.lower import Lowered, Message, Op
from timeprest.stage import Batches, StageRunner, StreamedBatches

T = TypeVar("T")

Channel = tuple[int, int, str]  # sender, receiver, kind


class CheckingMailbox:
    """In-process transport: FIFO channels that check every receive against its message."""

    def __init__(self, backward_unit: str = "microbatch") -> None:
        self.channels: dict[Channel, deque[tuple[Message, Tensor]]] = {}
        self.backward_unit = backward_unit

    @staticmethod
    def _channel(m: Message) -> Channel:
        return (m.src, m.dst, m.kind)

    def ready(self, op: Op) -> bool:
        if op.op != "recv":
            return True
        assert op.message is not None
        return bool(self.channels.get(self._channel(op.message)))

    def recv(self, op: Op) -> Tensor:
        want = op.message
        assert want is not None
        queue = self.channels.get(self._channel(want))
        if not queue:
            raise ScheduleError(
                f"stage {want.dst}, action {op.action} (program index {op.index}): "
                f"{want.describe(self.backward_unit)} was never sent"
            )
        got, tensor = queue[0]
        if got != want:
            raise ScheduleError(
                f"stage {want.dst}, action {op.action} (program index {op.index}) expects "
                f"{want.describe(self.backward_unit)}, but the next message on that channel is "
                f"{got.describe(self.backward_unit)}: the two stages' programs order their "
                "messages differently"
            )
        queue.popleft()
        return tensor

    def send(self, op: Op, tensor: Tensor) -> None:
        assert op.message is not None
        self.channels.setdefault(self._channel(op.message), deque()).append((op.message, tensor))

    def progress(self) -> None:
        pass

    def undelivered(self) -> list[Message]:
        return [m for q in self.channels.values() for m, _ in q]


def run_emulated(lowered: Lowered, runners: Sequence[StageRunner], batches: Batches) -> None:
    """Run every stage's lowered program to the end in one process."""
    mailbox = CheckingMailbox(lowered.schedule.backward_unit)
    stages = [
        StageExecutor(ops, runner, mailbox, batches)
        for ops, runner in zip(lowered.programs, runners)
    ]
    while not all(s.done for s in stages):
        progressed = False
        for s in stages:
            progressed = s.run() or progressed
        if not progressed:
            stuck = [
                f"stage {i} at {s.current} (action {s.current.action})"
                for i, s in enumerate(stages)
                if s.current is not None
            ]
            # a receive whose message is queued behind another one is a wrong order
            for s in stages:
                op = s.current
                if op is not None and op.op == "recv":
                    assert op.message is not None
                    queue = mailbox.channels.get(mailbox._channel(op.message))
                    if queue:
                        mailbox.recv(op)  # raises, naming both messages
            raise ScheduleError("the programs deadlock: " + "; ".join(stuck))
    left = mailbox.undelivered()
    if left:
        raise ScheduleError(
            "messages were sent but never received: "
            + ", ".join(m.describe(mailbox.backward_unit) for m in left[:4])
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

    def run(self, job: Job) -> Outcome:
        if job.replicas:  # data parallel: docs/design.md section 10
            from timeprest.engine.replicas import run_replicas

            return run_replicas(job, CheckingMailbox)
        batches = job.batches
        count = job.num_minibatches
        if count is None:
            batches = list(batches)
            count = len(batches)
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
