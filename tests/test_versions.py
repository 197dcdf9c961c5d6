"""The tensors behind weight versions: stash, release, byte accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timeprest.versions import VersionStore, optimizer_state_bytes, tensor_bytes


def test_a_stash_keeps_the_old_values_and_counts_its_bytes() -> None:
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    store = VersionStore([p])
    assert store.bytes_per_version == 32 and store.peak_versions == 1
    assert store.get(0)[0].data_ptr() == p.data_ptr()  # the latest is the live storage
    store.stash_latest()
    with torch.no_grad():
        p.add_(1.0)
    store.advance()
    assert torch.equal(store.get(0)[0], torch.ones(4, dtype=torch.float64))
    assert torch.equal(store.get(1)[0], p.detach())
    assert store.peak_versions == 2 and store.held_bytes == 64
    store.release(0)
    assert store.held_bytes == 32
    with pytest.raises(AssertionError, match="not held"):
        store.get(0)
    store.observe(transient_bytes=32)
    assert store.peak_bytes == 64
    store.reset_peaks()
    assert store.peak_versions == 1 and store.peak_bytes == 32


def test_optimizer_state_bytes() -> None:
    p = nn.Parameter(torch.zeros(10))
    opt = torch.optim.Adam([p])
    assert optimizer_state_bytes(opt) == 0 and optimizer_state_bytes(None) == 0
    p.grad = torch.ones(10)
    opt.step()
    # two moments of 10 float32 and a step count
    assert optimizer_state_bytes(opt) == 2 * 40 + tensor_bytes([opt.state[p]["step"]])


def test_a_released_stash_is_written_into_by_the_next() -> None:
    """The tensors of a dropped version come back for the next stash (no new allocation),
    and the new stash holds the new values, not the old ones."""
    p = nn.Parameter(torch.arange(6.0).reshape(2, 3))
    store = VersionStore([p])
    store.stash_latest()
    first = store.get(0)[0]
    assert not first.requires_grad and first.stride() == p.stride()
    with torch.no_grad():
        p.mul_(2.0)
    store.advance()
    store.release(0)
    assert store.pool.bytes == 24  # held for reuse, not counted as a version
    store.stash_latest()
    again = store.get(1)[0]
    assert again.data_ptr() == first.data_ptr() and store.pool.bytes == 0
    assert torch.equal(again, torch.arange(6.0).reshape(2, 3) * 2.0)
    # a differently shaped request never gets it
    store.release(1)
    other = store.pool.take(torch.zeros(3, 2))
    assert other.data_ptr() != first.data_ptr() and other.shape == (3, 2)
    store.pool.clear()
    assert store.pool.bytes == 0
