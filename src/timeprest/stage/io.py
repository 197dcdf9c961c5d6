"""What the first and the last stage read: micro-batch inputs, targets and loss weights.

A mini-batch is split into N micro-batches with ``torch.tensor_split`` along
dim 0 (docs/design.md section 2); micro-batch j's share of the mini-batch's
mean loss is ``n_j / n`` (section 7). Micro-batches are cut when a stage asks
for one, so an epoch is never held twice.

:class:`StreamedBatches` reads an iterable lazily (section 13): mini-batch t
is pulled when stage 0 first reads it, which in every schedule happens in
order of t, and dropped once the first and the last stage have read all its
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from torch import Tensor

from timeprest.errors import DataError

Minibatch = tuple[Tensor, Tensor]


class Batches(Protocol):
    """What the first and last stages read: micro-batch inputs and targets."""

    def input(self, t: int, j: int) -> Tensor: ...
    def target(self, t: int, j: int) -> Tensor: ...
    def fraction(self, t: int, j: int) -> float:
        """n_j / n: the weight of micro-batch j in mini-batch t's mean loss."""
        ...


def microbatch_rows(rows: int, n: int) -> list[int]:
    """Rows of each micro-batch of a mini-batch of ``rows`` rows (``torch.tensor_split``)."""
    return [rows // n + (1 if j < rows % n else 0) for j in range(n)]


def _cut(x: Tensor, n: int, j: int) -> Tensor:
    """Rows of micro-batch j, as ``torch.tensor_split(x, n)[j]`` (without making all n)."""
    rows, extra = divmod(int(x.shape[0]), n)
    start = j * rows + min(j, extra)
    # a clone, not a view: a micro-batch owns its rows, so its saved input counts its
    # own bytes rather than the whole mini-batch's storage
    return x.narrow(0, start, rows + (1 if j < extra else 0)).clone()


class SplitBatches:
    """Mini-batches held in a sequence, split into micro-batches on demand."""

    def __init__(self, batches: Sequence[Minibatch], num_microbatches: int) -> None:
        self._n = num_microbatches
        self._batches = batches

    def input(self, t: int, j: int) -> Tensor:
        return _cut(self._batches[t][0], self._n, j)

    def target(self, t: int, j: int) -> Tensor:
        return _cut(self._batches[t][1], self._n, j)

    def fraction(self, t: int, j: int) -> float:
        rows = int(self._batches[t][0].shape[0])
        return microbatch_rows(rows, self._n)[j] / rows


class StreamedBatches:
    """``num_minibatches`` mini-batches pulled lazily from an iterable, each checked once.

    ``check(t, batch)`` validates a mini-batch when it is pulled (and may
    return it converted). A mini-batch is dropped after its N inputs and N
    targets have been read, so at most the mini-batches between stage 0's
    forward and the last stage's forward are held.
    """

    def __init__(
        self,
        batches: Iterable[object],
        num_microbatches: int,
        num_minibatches: int,
        check: Callable[[int, object], Minibatch],
        *,
        first_and_last: tuple[bool, bool] = (True, True),
    ) -> None:
        self._iter: Iterator[object] = iter(batches)
        self._n = num_microbatches
        self._count = num_minibatches
        self._check = check
        self._pulled = 0
        self._held: dict[int, Minibatch] = {}
        self._reads: dict[int, int] = {}
        # reads that drop a mini-batch: N inputs and/or N targets, as this process reads them
        self._reads_needed = num_microbatches * sum(first_and_last)
        self.peak_held = 0
        self._fractions: dict[int, list[float]] = {}

    def _get(self, t: int) -> Minibatch:
        while self._pulled <= t:
            if self._pulled >= self._count:
                raise AssertionError(f"mini-batch {t} asked for beyond the {self._count} planned")
            try:
                raw = next(self._iter)
            except StopIteration:
                raise DataError(
                    f"the batches ended after {self._pulled} mini-batches, but "
                    f"{self._count} were announced (num_minibatches or len())"
                ) from None
            self._held[self._pulled] = self._check(self._pulled, raw)
            self._pulled += 1
            self.peak_held = max(self.peak_held, len(self._held))
        try:
            return self._held[t]
        except KeyError:
            raise AssertionError(f"mini-batch {t} was read after it was dropped") from None

    def _read(self, t: int) -> None:
        self._reads[t] = self._reads.get(t, 0) + 1
        if self._reads[t] == self._reads_needed:
            del self._held[t], self._reads[t]

    def input(self, t: int, j: int) -> Tensor:
        x = _cut(self._get(t)[0], self._n, j)
        self._read(t)
        return x

    def target(self, t: int, j: int) -> Tensor:
        y = _cut(self._get(t)[1], self._n, j)
        self._read(t)
        return y

    def fraction(self, t: int, j: int) -> float:
        rows = int(self._get(t)[0].shape[0])
        fractions = self._fractions.get(rows)
        if fractions is None:  # the same few row counts all epoch long
            fractions = self._fractions[rows] = [r / rows for r in microbatch_rows(rows, self._n)]
        return fractions[j]

    @property
    def held(self) -> int:
        return len(self._held)


class NoBatches:
    """A middle stage of the distributed runtime reads no data."""

    def input(self, t: int, j: int) -> Tensor:
        raise AssertionError("a middle stage read an input")

    def target(self, t: int, j: int) -> Tensor:
        raise AssertionError("a middle stage read a target")

    def fraction(self, t: int, j: int) -> float:
        raise AssertionError("a middle stage read a loss fraction")
