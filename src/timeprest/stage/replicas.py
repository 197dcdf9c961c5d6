"""Data-parallel replicas of a stage: the arithmetic both engines share (docs/design.md section 10).

D replicas of the whole pipeline train on one mini-batch: replica r takes part
r of ``torch.tensor_split(batch, D)`` and cuts it into N micro-batches. Each
replica's accumulated gradient is that of the mean loss over its own part, so
before ``U{t}`` the D copies of a stage combine them weighted by rows,
``g = sum_r (n_r / n) g_r``, which is the gradient of the mean loss over the
whole mini-batch. The sum runs over the replicas in order 0..D-1, always in
the same floating-point operations: the emulator (all replicas in one
process) and the distributed runtime (one all-gather over the stage's ``dp``
group) call the same :func:`combine_gradients`, and so give the same bits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from timeprest.stage.io import Minibatch, microbatch_rows
from timeprest.stage.weights import Grads

# t (mini-batch of this train() call), this replica's gradients -> the combined gradients
GradCombiner = Callable[[int, Grads], Grads]


def part_rows(rows: int, num_replicas: int) -> list[int]:
    """Rows of each replica's part of a mini-batch of ``rows`` rows (``torch.tensor_split``)."""
    return microbatch_rows(rows, num_replicas)


def part_weights(rows: int, num_replicas: int) -> list[float]:
    """``n_r / n`` per replica: each part's share of the mini-batch's mean loss."""
    return [p / rows for p in part_rows(rows, num_replicas)]


def replica_part(batch: Minibatch, replica: int, num_replicas: int) -> Minibatch:
    """Part ``replica`` of a mini-batch: the rows that replica trains on."""
    x, y = batch
    return (
        torch.tensor_split(x, num_replicas)[replica],
        torch.tensor_split(y, num_replicas)[replica],
    )


def replica_seed(seed: int, replica: int) -> int:
    """The runner seed of ``replica``: replica 0 keeps the pipeline's, so that D = 1 is unchanged;
    the others draw their own dropout masks (their rows differ, their masks should too)."""
    return seed if replica == 0 else (seed * 1_000_039 + replica) % (2**63 - 1)


def combine_gradients(per_replica: Sequence[Grads], weights: Sequence[float]) -> Grads:
    """``sum_r weights[r] * grads[r]`` per parameter, over the replicas in order.

    A parameter without a gradient on some replica counts as zero there; one
    without a gradient on every replica keeps none (as with one replica, the
    optimizer then skips it).
    """
    out: Grads = []
    for i in range(len(per_replica[0])):
        acc: Tensor | None = None
        for grads, w in zip(per_replica, weights):
            g = grads[i]
            if g is None:
                continue
            term = g * w
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def combine_losses(losses: Sequence[float], weights: Sequence[float]) -> float:
    """The whole mini-batch's loss from each replica's (mean over its part), in replica order."""
    total = 0.0
    for loss, w in zip(losses, weights):
        total += w * loss
    return total


class EmulatedReduction:
    """The combination of one stage's D copies in one process (the emulator's ``dp`` group).

    The emulator lets a copy reach ``U{t}`` only once every copy of the stage is
    there, so the first caller finds all the accumulated gradients, combines them
    and keeps the result until each copy has taken its own.
    """

    def __init__(
        self, accumulated: Sequence[Callable[[], Grads]], weights: Callable[[int], list[float]]
    ) -> None:
        self._accumulated = accumulated  # per replica: its runner's gradients so far
        self._weights = weights
        self._result: dict[int, tuple[Grads, int]] = {}  # t -> (combined, copies served)

    def hook(self, replica: int) -> GradCombiner:
        """The combiner that replica ``replica``'s runner calls before its optimizer step."""

        def combine(t: int, grads: Grads) -> Grads:
            if t not in self._result:
                per_replica = [get() for get in self._accumulated]
                self._result[t] = (combine_gradients(per_replica, self._weights(t)), 0)
            combined, served = self._result[t]
            served += 1
            if served == len(self._accumulated):
                del self._result[t]
            else:
                self._result[t] = (combined, served)
            # each copy steps its own tensors: an optimizer may keep or change p.grad
            return [None if g is None else g.clone() for g in combined]

        return combine


class Fanout:
    """Reads an iterable of mini-batches once and hands each replica its part, lazily.

    ``check(t, batch)`` validates a mini-batch when it is first pulled. Replica
    r's stream (:meth:`stream`) yields part r of each mini-batch in order; a part
    is held only until its replica has taken it.
    """

    def __init__(
        self,
        batches: Iterable[object],
        num_replicas: int,
        check: Callable[[int, object], Minibatch],
    ) -> None:
        self._iter = iter(batches)
        self._check = check
        self._pulled = 0
        self._queues: list[deque[Minibatch]] = [deque() for _ in range(num_replicas)]
        self.rows: list[int] = []  # rows of each mini-batch pulled so far

    def _pull(self) -> bool:
        try:
            raw = next(self._iter)
        except StopIteration:
            return False
        batch = self._check(self._pulled, raw)
        self.rows.append(int(batch[0].shape[0]))
        self._pulled += 1
        d = len(self._queues)
        for r, q in enumerate(self._queues):
            q.append(replica_part(batch, r, d))
        return True

    def stream(self, replica: int) -> Iterator[Minibatch]:
        q = self._queues[replica]
        while True:
            if not q and not self._pull():
                return
            yield q.popleft()
