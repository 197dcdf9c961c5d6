"""The tensors behind weight versions at one stage, with byte accounting.

The latest version is the stage's live parameters (the optimizer updates
them in place). An older version that a later action still reads is kept
("stashed") from just before the update that would overwrite it until right
after its last reader: the version plan (:mod:`timeprest.policy.plan`) says
when. Stashing keeps the tensors that held the version and moves the
parameters to a copy, which the optimizer then updates: so a forward's saved
tensors of that version stay untouched, and a backward that reads it can use
what autograd kept (docs/design.md section 5).

A dropped copy's tensors go back to a :class:`BufferPool` and the next copy
is written into them, as is the intermediate weight of a backward: a fresh
weight-sized tensor costs more than the copy itself on a CPU, where each new
large allocation is new pages the kernel has to zero (docs/design.md
section 8). The pool never holds more than the plan's peak, and it is
emptied when a schedule has drained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def tensor_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors an optimizer keeps (momentum, Adam moments, step counts)."""
    if optimizer is None:
        return 0
    return tensor_bytes(
        [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    )


def own_counter(w: Tensor) -> Tensor:
    """``w``'s storage and layout under a tensor with its own version counter: in-place
    changes made through ``w`` change what it reads but do not count as changes of it,
    so autograd keeps it without objecting to the updates of the parameter ``w``."""
    # an empty tensor of w's dtype and device set to w's storage, offset, sizes and strides
    # (Tensor.set_(source) with a tensor source; half the cost of torch.empty and the four
    # arguments spelled out, and this runs per weight at every live forward; torch's type
    # stubs list only the storage overload)
    return w.new_empty(0).set_(w)  # type: ignore[call-overload]


class BufferPool:
    """Spare tensors by (shape, strides, dtype, device), for weight-sized scratch."""

    def __init__(self) -> None:
        self._free: dict[tuple[object, ...], list[Tensor]] = {}

    @staticmethod
    def _key(t: Tensor) -> tuple[object, ...]:
        return (t.shape, t.stride(), t.dtype, t.device)

    def take(self, like: Tensor) -> Tensor:
        """A tensor shaped as ``like`` (uninitialised: the caller writes all of it)."""
        free = self._free.get(self._key(like))
        if free:
            return free.pop()
        return torch.empty_like(like, memory_format=torch.preserve_format)

    def give(self, tensors: list[Tensor]) -> None:
        """Return tensors nothing reads any more."""
        for t in tensors:
            self._free.setdefault(self._key(t), []).append(t)

    def clear(self) -> None:
        self._free.clear()

    @property
    def bytes(self) -> int:
        return sum(tensor_bytes(ts) for ts in self._free.values())


class VersionStore:
    """Weight versions of one stage.

    Versions are numbered from 0 (the weights before the first update);
    ``latest`` is the number of updates applied so far.
    """

    def __init__(self, params: list[nn.Parameter], latest: int = 0) -> None:
        self.params = params
        self.latest = latest
        self._stash: dict[int, list[Tensor]] = {}
        self.pool = BufferPool()
        self.bytes_per_version = tensor_bytes([p.detach() for p in params])
        # detached views of the live parameters, made once: the updates change them in
        # place; a stash moves the parameters to other storage and forgets these
        self._live: list[Tensor] | None = None
        self.peak_versions = 1
        self.peak_bytes = self.bytes_per_version

    # -- reading -----------------------------------------------------------
    def get(self, version: int) -> list[Tensor]:
        """Detached tensors of ``version`` (the live storage for the latest)."""
        if version == self.latest:
            if self._live is None:
                self._live = [p.detach() for p in self.params]
            return self._live
        try:
            return self._stash[version]
        except KeyError:
            held = sorted([*self._stash, self.latest])
            raise AssertionError(
                f"weight version {version} is not held (held: {held}); the version plan is wrong"
            ) from None

    def drop_views(self) -> None:
        """Forget the live views (the parameters may have moved between schedules: a
        checkpoint loaded, ``module.to``)."""
        self._live = None

    @property
    def held_bytes(self) -> int:
        return self.bytes_per_version * (1 + len(self._stash))

    # -- changing ----------------------------------------------------------
    def stash_latest(self, moved_to: list[Tensor] | None = None) -> None:
        """Keep the latest version before an update overwrites it: its tensors become the
        stash, and the parameters move to a copy (which the update then changes), or to
        ``moved_to``, pool tensors an update has already written the next version into."""
        with torch.no_grad():
            kept = [own_counter(p.detach()) for p in self.params]
            for i, p in enumerate(self.params):
                if moved_to is None:
                    fresh = self.pool.take(p)
                    fresh.copy_(p.detach())
                else:
                    fresh = moved_to[i]
                p.data = fresh
            self._stash[self.latest] = kept
        self.drop_views()
        self.observe()

    def advance(self) -> None:
        """Record that an update made version ``latest + 1`` from ``latest``."""
        self.latest += 1

    def release(self, version: int) -> None:
        copies = self._stash.pop(version, None)
        if copies is not None:
            self.pool.give(copies)

    def observe(self, transient_bytes: int = 0) -> None:
        """Update the peaks with what is held now (plus a transient intermediate weight)."""
        self.peak_versions = max(self.peak_versions, 1 + len(self._stash))
        self.peak_bytes = max(self.peak_bytes, self.held_bytes + transient_bytes)

    def reset_peaks(self) -> None:
        self.peak_versions = 1 + len(self._stash)
        self.peak_bytes = self.held_bytes
