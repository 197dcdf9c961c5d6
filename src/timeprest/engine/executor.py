"""The one loop that runs a stage's lowered program: both engines use it.

An engine differs only in its :class:`Transport`: the emulator's is an
in-process mailbox that can say "not yet" (:meth:`Transport.ready`), the
runtime's blocks on point-to-point messages. The executor walks the ops of
:mod:`timeprest.schedule.lower` in order: a receive hands its tensor to the
next computation, a computation's result goes to the next send.
"""

from __future__ import annotations

import time
from typing import Protocol

from torch import Tensor

from timeprest.schedule.lower import Op
from timeprest.stage import Batches, StageRunner


class Transport(Protocol):
    """Moves the messages of lowered programs between stages."""

    @property
    def waited(self) -> float:
        """Seconds the receives have spent waiting for a message still on its way
        (cumulative; a receive's own work, such as copying the message out, not counted;
        an in-process mailbox, which never waits, keeps 0)."""
        ...

    def ready(self, op: Op) -> bool:
        """Whether ``op`` can run now: a receive, whether its message has arrived (a blocking
        transport says True); another op, whether it may start (data-parallel copies of a
        stage start an update together in the emulator)."""
        ...

    def recv(self, op: Op) -> Tensor: ...

    def send(self, op: Op, tensor: Tensor) -> None: ...

    def progress(self) -> None:
        """Called after each action: a chance to post receives ahead."""
        ...


class StageExecutor:
    """Runs the ops of one stage on its runner; resumable where the transport is not ready."""

    def __init__(
        self, ops: tuple[Op, ...], runner: StageRunner, transport: Transport, batches: Batches
    ) -> None:
        self.ops = ops
        self.runner = runner
        self.transport = transport
        self.batches = batches
        self.pos = 0
        self._value: Tensor | None = None  # received, or to be sent

    @property
    def done(self) -> bool:
        return self.pos >= len(self.ops)

    @property
    def current(self) -> Op | None:
        return None if self.done else self.ops[self.pos]

    def run(self) -> bool:
        """Execute ops until the program ends or a receive is not ready; True if any ran."""
        start = self.pos
        r, tr, ops = self.runner, self.transport, self.ops
        end = len(ops)
        while self.pos < end:
            op = ops[self.pos]
            if not tr.ready(op):
                break
            # an update that must first meet other stages' gradients (docs/design.md section 11)
            if op.op == "run" and op.action.kind == "U" and not r.update_ready(op.action.minibatch):
                break
            if op.first:
                r.begin_action(op.index, op.action)
            if op.op == "recv":
                if r.action_times is None:
                    self._value = tr.recv(op)
                else:
                    w0, t0 = tr.waited, time.perf_counter()
                    self._value = tr.recv(op)
                    r.recv_seconds += time.perf_counter() - t0
                    r.wait_seconds += tr.waited - w0
            elif op.op == "send":
                assert self._value is not None, f"nothing to send at {op}"
                tr.send(op, self._value)
                self._value = None
            else:
                a = op.action
                if a.kind == "F":
                    assert op.microbatch is not None
                    self._value = r.forward(a.minibatch, op.microbatch, self._value, self.batches)
                elif a.kind == "B":
                    assert op.microbatch is not None
                    self._value = r.backward(a.minibatch, op.microbatch, self._value)
                else:
                    r.update(op.index, a.minibatch)
            self.pos += 1
            if op.last:
                r.end_action(op.index, op.action)
                tr.progress()
        return self.pos > start
