"""The backward adds each weight gradient into the accumulator inside autograd
(``StageRunner._backward_into_accumulators``): the same numbers as taking every micro-batch's
gradients from ``autograd.grad`` and adding them after, on the awkward cases."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import timeprest
from timeprest.errors import MultipleSequenceWarning
from timeprest.stage.runner import StageRunner

ROWS = 2  # rows per micro-batch: the pass-through parameter below has this shape


class Awkward(nn.Module):
    """A weight used twice and once transposed, a parameter that gets no gradient, a
    parameter whose gradient is the input gradient itself, and BatchNorm statistics."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, width, dtype=torch.float64) / width)
        self.unused = nn.Parameter(torch.randn(width, dtype=torch.float64))
        self.shift = nn.Parameter(torch.randn(ROWS, width, dtype=torch.float64))
        self.norm = nn.BatchNorm1d(width, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.shift  # d shift = d x: the same tensor
        h = torch.tanh(x @ self.w) @ self.w.t()
        return self.norm(h)


class Sparse(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, width, sparse=True, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.emb(x).sum(1)


def reference(self: StageRunner, saved, grad_out, want_dx):  # type: ignore[no-untyped-def]
    """Every micro-batch's gradients from autograd.grad, added after (the path that stays
    for unscaled and corrected gradients)."""
    inputs = list(saved.leaves) + ([saved.x] if want_dx and saved.x is not None else [])
    res = torch.autograd.grad(saved.out, inputs, grad_outputs=grad_out, allow_unused=True)
    grads, dx = list(res[: len(saved.leaves)]), (res[-1] if want_dx else None)
    self._accumulate(grads, dx)
    return dx


def train(stages: list[nn.Module], batches, method: str, n: int) -> tuple[list[float], list]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        pipe = timeprest.Pipeline(
            copy.deepcopy(stages),
            method=method,
            num_microbatches=n,
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5),
            loss_fn=nn.functional.mse_loss,
        )
        losses = pipe.train(batches)
    state = [t.detach().clone() for r in pipe.runners for t in [*r.params, *r.module.buffers()]]
    return losses, state


@pytest.mark.parametrize(("method", "n"), [("gpipe", 2), ("pipedream", 1), ("v-timeprest", 2),
                                           ("i-timeprest", 3)])  # fmt: skip
def test_accumulating_in_autograd_gives_the_same_numbers(monkeypatch, method: str, n: int):
    torch.manual_seed(0)
    stages: list[nn.Module] = [Awkward(), Awkward(), nn.Linear(6, 6, dtype=torch.float64)]
    g = torch.Generator().manual_seed(1)
    rows = ROWS * n
    batches = [
        (
            torch.randn(rows, 6, generator=g, dtype=torch.float64),
            torch.randn(rows, 6, generator=g, dtype=torch.float64),
        )
        for _ in range(5)
    ]
    got = train(stages, batches, method, n)
    monkeypatch.setattr(StageRunner, "_backward_into_accumulators", reference)
    want = train(stages, batches, method, n)
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_sparse_gradients_accumulate_alike(monkeypatch):
    torch.manual_seed(0)
    stages: list[nn.Module] = [Sparse(), nn.Linear(6, 6, dtype=torch.float64)]
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randint(0, 10, (4, 3), generator=g), torch.randn(4, 6, dtype=torch.float64))
        for _ in range(4)
    ]
    got = train(stages, batches, "v-timeprest", 2)
    monkeypatch.setattr(StageRunner, "_backward_into_accumulators", reference)
    want = train(stages, batches, "v-timeprest", 2)
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
