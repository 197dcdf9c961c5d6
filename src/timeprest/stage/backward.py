"""The weights a stage's backward reads, and their distance from the latest ones.

Per forward version v and latest version k, the policy says what the backward
reads (docs/design.md section 5): a held version, a blend of two
(I-TiMePReSt's intermediate weight, into pool tensors), or the latest minus a
velocity (docs/design.md section 12). The micro-batches of one backward action
often share (v, k), so the weights and the report's relative distance
(docs/design.md section 8) are built once per action; the blend's tensors go
back to the pool when the action ends.
"""

from __future__ import annotations

from torch import Tensor

from timeprest.policy.rules import Policy
from timeprest.stage.remedies import StageRemedies
from timeprest.stage.weights import blend, relative_distance
from timeprest.versions import VersionStore, tensor_bytes

Built = tuple[list[Tensor], int, float | None]  # weights, transient bytes, distance


class BackwardWeights:
    """Builds and caches, for one backward action, the weights each forward version's
    micro-batches read."""

    def __init__(self, policy: Policy, store: VersionStore, remedies: StageRemedies) -> None:
        self.policy = policy
        self.store = store
        self.remedies = remedies
        self._cache: dict[int, Built] = {}
        self._owned: list[Tensor] = []  # pool tensors behind the cached blends

    def get(self, v: int, k: int, base_version: int, measure: bool) -> Built:
        """The backward weights of forward version v at latest version k (absolute), the
        transient bytes they add, and their relative distance (None unless ``measure``)."""
        built = self._cache.get(v)
        if built is None:
            weights, transient = self._build(v, k, base_version)
            built = (weights, transient, self._distance(weights, k, v, measure))
            self._cache[v] = built
        return built

    def drop(self) -> None:
        """The action ended (or starts): forget the weights, give the blends back."""
        self._cache = {}
        if self._owned:
            self.store.pool.give(self._owned)
            self._owned = []

    def _build(self, v: int, k: int, base_version: int) -> tuple[list[Tensor], int]:
        if self.policy.velocity_scale(k - v) != 0.0:  # [remedies] w_k - c * delta
            return self.remedies.velocity_weights(self.store.get(k), k - v)
        reads = self.policy.weight_reads(v - base_version, k - base_version)
        if len(reads) == 1:
            return self.store.get(base_version + reads[0]), 0
        sigma = self.policy.significance(k - v)
        mixed = blend(self.store.pool, self.store.get(v), self.store.get(k), sigma)
        self._owned.extend(mixed)
        return mixed, tensor_bytes(mixed)

    def _distance(self, weights: list[Tensor], k: int, v: int, measure: bool) -> float | None:
        """0 when the weights are the latest; None at a mini-batch that is not measured,
        zero or not, so that the means over the measured ones are not pulled toward 0."""
        if not measure:
            return None
        if v == k or not weights:
            return 0.0
        latest = self.store.get(k)
        if all(a is b or a.data_ptr() == b.data_ptr() for a, b in zip(weights, latest)):
            return 0.0
        return relative_distance(weights, latest)
