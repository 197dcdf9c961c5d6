"""The tensors behind weight versions: stash, release, byte accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timeprest.versions import VersionStore, optimizer_state_bytes, own_counter, tensor_bytes


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_own_counter_is_the_same_memory_under_its_own_version_counter(dtype: torch.dtype) -> None:
    base = torch.arange(60.0).to(dtype).reshape(6, 10)
    for w in (base, base[1:, 2:7], base.t()):  # offset and strided views too
        alias = own_counter(w)
        assert alias.dtype == w.dtype and alias.device == w.device
        assert alias.shape == w.shape and alias.stride() == w.stride()
        assert alias.storage_offset() == w.storage_offset()
        assert alias.data_ptr() == w.data_ptr() and torch.equal(alias, w)
        before = alias._version
        w.add_(1)  # an update of the original is seen, but not counted, by the alias
        assert torch.equal(alias, w) and alias._version == before
        w.sub_(1)


def test_optimizer_state_bytes() -> None:
    p = nn.Parameter(torch.zeros(10))
    opt = torch.optim.Adam([p])
    assert optimizer_state_bytes(opt) == 0 and optimizer_state_bytes(None) == 0
    p.grad = torch.ones(10)
    opt.step()
    # two moments of 10 float32 and a step count
    assert optimizer_state_bytes(opt) == 2 * 40 + tensor_bytes([opt.state[p]["step"]])


def test_a_stash_keeps_the_tensors_and_the_parameter_moves_to_a_reused_copy() -> None:
    """Stashing keeps the tensors that held the version (a forward's saved tensors of it
    stay valid) and moves the parameter to a copy; a released stash's tensors are where
    the next move goes (no new allocation); a differently shaped request never gets them."""
    p = nn.Parameter(torch.arange(6.0).reshape(2, 3))
    before = p.detach()
    store = VersionStore([p])
    store.stash_latest()
    with torch.no_grad():
        p.mul_(2.0)
    store.advance()
    kept = store.get(0)[0]
    assert kept.data_ptr() == before.data_ptr() and p.data_ptr() != before.data_ptr()
    assert not kept.requires_grad and kept.stride() == p.stride()
    assert torch.equal(kept, torch.arange(6.0).reshape(2, 3))  # untouched by the update
    seen = kept._version
    with torch.no_grad():
        p.add_(1.0)  # a further update does not count as a change of the stash
    assert kept._version == seen and torch.equal(kept, torch.arange(6.0).reshape(2, 3))
    with torch.no_grad():
        p.sub_(1.0)
    store.release(0)
    assert store.pool.bytes == 24  # held for reuse, not counted as a version
    store.stash_latest()
    assert p.data_ptr() == before.data_ptr() and store.pool.bytes == 0
    assert torch.equal(store.get(1)[0], torch.arange(6.0).reshape(2, 3) * 2.0)
    assert torch.equal(p.detach(), torch.arange(6.0).reshape(2, 3) * 2.0)
    store.release(1)
    other = store.pool.take(torch.zeros(3, 2))
    assert other.shape == (3, 2) and store.pool.bytes == 24
    store.pool.clear()
    assert store.pool.bytes == 0
