"""The emulator's transport and its loop: checking mailboxes, stages driven round by round.

The mailbox is one first-in first-out queue per channel (sender, receiver,
kind). A receive must find exactly the message its program expects at the
head of the queue, so a program whose receive order differs from its
neighbour's send order fails with the stage, the action and both messages
named, just as it would hang or mismatch on a real transport. :func:`drive`
runs stage executors (of one pipeline, or of several replicas) round after
round, each as far as its messages allow, and says why when they stop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from torch import Tensor

from timeprest.engine.executor import StageExecutor
from timeprest.errors import ScheduleError
from timeprest.schedule.lower import Message, Op

Channel = tuple[int, int, str]  # sender, receiver, kind


class CheckingMailbox:
    """In-process transport: FIFO channels that check every receive against its message."""

    waited = 0.0  # a message is there or the executor does not ask for it

    def __init__(self, backward_unit: str = "microbatch") -> None:
        self.channels: dict[Channel, deque[tuple[Message, Tensor]]] = {}
        self.backward_unit = backward_unit

    @staticmethod
    def channel(m: Message) -> Channel:
        return (m.src, m.dst, m.kind)

    def ready(self, op: Op) -> bool:
        if op.op != "recv":
            return True
        m = op.message
        assert m is not None
        return bool(self.channels.get((m.src, m.dst, m.kind)))  # channel(m), without the call

    def recv(self, op: Op) -> Tensor:
        want = op.message
        assert want is not None
        queue = self.channels.get(self.channel(want))
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
        self.channels.setdefault(self.channel(op.message), deque()).append((op.message, tensor))

    def progress(self) -> None:
        pass

    def undelivered(self) -> list[Message]:
        return [m for q in self.channels.values() for m, _ in q]


def drive(executors: Sequence[StageExecutor], mailboxes: Sequence[CheckingMailbox]) -> None:
    """Run ``executors`` to the end, round after round; ``mailboxes``: every one they use.

    A round without progress is a deadlock, reported with the op each stage waits
    at (or, when a receive finds another message at the head of its channel, as
    that wrong order); messages left in a mailbox at the end are an error too.
    """
    while not all(ex.done for ex in executors):
        progressed = False
        for ex in executors:
            progressed = ex.run() or progressed
        if progressed:
            continue
        for ex in executors:  # a receive whose message is queued behind another one
            op = ex.current
            if op is not None and op.op == "recv":
                assert op.message is not None
                for mailbox in mailboxes:
                    if mailbox.channels.get(mailbox.channel(op.message)):
                        mailbox.recv(op)  # raises, naming both messages
        stuck = [
            f"stage {ex.runner.index} at {ex.current} (action {ex.current.action})"
            for ex in executors
            if ex.current is not None
        ]
        raise ScheduleError("the programs deadlock: " + "; ".join(stuck[:6]))
    left = [(mb, m) for mb in mailboxes for m in mb.undelivered()]
    if left:
        raise ScheduleError(
            "messages were sent but never received: "
            + ", ".join(m.describe(mb.backward_unit) for mb, m in left[:4])
        )
