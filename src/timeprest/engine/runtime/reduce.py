"""The gradient combination of a stage's D copies over their ``dp`` group (docs/design.md section 10).

Before ``U{t}`` every copy flattens its accumulated gradients (one buffer per
dtype, zeros where a parameter got none, and a mask saying which did) and
all-gathers them over the stage's ``dp`` group. Each copy then sums the
replicas' gradients itself, in replica order, with
:func:`~timeprest.stage.replicas.combine_gradients`: the same operations
as the emulator, so the same bits, and the same result on every copy (an
all-reduce would leave the order of the sum to the backend). The buffers
live on the stage's device, so the code runs on NCCL as on gloo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from timeprest.engine.runtime.failures import CommError
from timeprest.engine.runtime.layout import Layout
from timeprest.stage.replicas import GradCombiner, Grads, combine_gradients, part_weights


class DistributedReduction:
    """All-gathers one stage's gradients over its ``dp`` group and combines them by rows."""

    def __init__(
        self,
        group: Any,
        layout: Layout,
        params: Sequence[nn.Parameter],
        rows: Sequence[int],
        device: torch.device,
    ) -> None:
        self.group = group
        self.rows = rows  # rows of each whole mini-batch of this train() call
        self.device = device
        self.shapes = [p.shape for p in params]
        self.dtypes = [p.dtype for p in params]
        self.buckets = list(dict.fromkeys(self.dtypes))  # dtypes, in order of first use
        # group rank i is global rank order[i]: its replica places its gradients
        members = dist.get_process_group_ranks(group)
        self.replica_of = [layout.position(g)[0] for g in members]
        self.num_replicas = layout.num_replicas
        others = [g for g in members if g != layout.rank]
        self.peer = others[0] if len(others) == 1 else None  # named when the gather fails

    def _gather(self, x: Tensor, what: str) -> list[Tensor]:
        out = [torch.empty_like(x) for _ in range(self.num_replicas)]
        try:
            dist.all_gather(out, x, group=self.group)
        except Exception as exc:
            raise CommError(self.peer, what, exc) from exc
        ordered: list[Tensor] = [out[0]] * self.num_replicas
        for i, r in enumerate(self.replica_of):
            ordered[r] = out[i]
        return ordered

    def combine(self, t: int, grads: Grads) -> Grads:
        what = f"its gradients of mini-batch {t} for the combination of the replicas"
        mask = torch.tensor([g is not None for g in grads], dtype=torch.int64, device=self.device)
        present = [m.tolist() for m in self._gather(mask, what)]
        per_replica: list[Grads] = [[None] * len(grads) for _ in range(self.num_replicas)]
        for dtype in self.buckets:
            idx = [i for i, d in enumerate(self.dtypes) if d == dtype]
            parts: list[Tensor] = []
            for i in idx:
                g = grads[i]
                n = self.shapes[i].numel()
                parts.append(
                    torch.zeros(n, dtype=dtype, device=self.device) if g is None else g.reshape(-1)
                )
            gathered = self._gather(torch.cat(parts), what)
            for r, flat in enumerate(gathered):
                offset = 0
                for i in idx:
                    n = self.shapes[i].numel()
                    if present[r][i]:
                        per_replica[r][i] = flat[offset : offset + n].view(self.shapes[i])
                    offset += n
        return combine_gradients(per_replica, part_weights(self.rows[t], self.num_replicas))

    def hook(self) -> GradCombiner:
        return self.combine
