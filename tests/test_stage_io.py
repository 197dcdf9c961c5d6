"""Micro-batch sources: splitting like torch.tensor_split, and streaming with drops."""

from __future__ import annotations

import pytest
import torch

from timeprest.errors import DataError
from timeprest.stage import SplitBatches, StreamedBatches, microbatch_rows


def test_microbatch_rows_match_tensor_split() -> None:
    for rows in range(1, 20):
        for n in range(1, rows + 1):
            want = [len(c) for c in torch.tensor_split(torch.zeros(rows), n)]
            assert microbatch_rows(rows, n) == want


def minibatches(count: int, rows: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.arange(rows * 2.0).view(rows, 2) + 100 * t, torch.arange(rows) + t)
        for t in range(count)
    ]


def test_split_batches_cut_as_tensor_split_does() -> None:
    for rows in (1, 2, 7, 16, 33):
        for n in range(1, min(rows, 9) + 1):
            x = torch.arange(rows * 2).reshape(rows, 2)
            source = SplitBatches([(x, x)], n)
            for j, want in enumerate(torch.tensor_split(x, n)):
                assert torch.equal(source.input(0, j), want)


def test_split_batches_cut_owned_microbatches() -> None:
    data = minibatches(2)
    src = SplitBatches(data, 2)
    x = src.input(1, 1)
    assert torch.equal(x, torch.tensor_split(data[1][0], 2)[1])
    assert x.untyped_storage().nbytes() == x.numel() * x.element_size()  # a copy, not a view
    assert src.fraction(0, 0) == 3 / 5 and src.fraction(0, 1) == 2 / 5


def checked(t: int, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(b, tuple)
    return b


def test_streamed_batches_pull_in_order_and_drop_after_last_use() -> None:
    data = minibatches(3)
    pulled: list[int] = []

    def gen():
        for t, b in enumerate(data):
            pulled.append(t)
            yield b

    src = StreamedBatches(gen(), 2, 3, checked)
    assert pulled == []  # nothing read before a stage asks
    assert torch.equal(src.input(0, 0), torch.tensor_split(data[0][0], 2)[0])
    assert pulled == [0]
    src.input(0, 1)
    assert src.fraction(0, 1) == 2 / 5
    src.target(0, 0)
    assert src.held == 1
    src.target(0, 1)  # the N-th input and the N-th target: mini-batch 0 is dropped
    assert src.held == 0
    with pytest.raises(AssertionError, match="after it was dropped"):
        src.input(0, 0)
    src.input(2, 0)  # pulls 1 and 2
    assert pulled == [0, 1, 2] and src.held == 2


def test_streamed_batches_that_end_early_are_a_data_error() -> None:
    src = StreamedBatches(iter(minibatches(1)), 1, 2, checked)
    src.input(0, 0)
    with pytest.raises(DataError, match="ended after 1 mini-batches, but 2"):
        src.input(1, 0)
