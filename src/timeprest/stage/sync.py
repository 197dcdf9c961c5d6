"""Stages that agree on their gradients before an update: tied tensors and the global norm.

docs/design.md section 11. A tensor used by two stages (the tied input and
output embeddings of a language model) is held as one copy per stage, both
starting equal. Under a flush schedule every stage's backward of mini-batch t
ends before any stage needs its update's result, so before ``U{t}`` the
stages holding a copy can sum their gradients of it: every copy then receives
the same gradient and the same optimizer step, and the copies stay bitwise
equal. The same meeting point gives the global gradient norm: the squared
norms of every stage's gradient are summed (a tied tensor counted once, as in
the unsplit model), so clipping equals ``torch.nn.utils.clip_grad_norm_`` on
the whole model.

:class:`UpdateGroup` is that meeting point for runners in one process (the
emulator): a member's ``U{t}`` waits (:meth:`UpdateGroup.ready`) until every
member has reached its ``U{t}``; the first of them to update combines the
gradients of all, and each takes its own share. Asynchronous schedules update
a stage while another stage's backward of the same mini-batch is still to
come, so there is no such point: :func:`check_group` refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from timeprest.errors import ConfigError
from timeprest.stage.weights import Grads

Tied = tuple[tuple[int, str], ...]
"""One tensor held by several stages: its (stage, parameter name in the stage) places."""

FLUSH_SCHEDULES = ("gpipe", "1f1b")
CLIP_SCOPES = ("stage", "global")


class StageRunner(Protocol):
    """What the group reads and sets of a :class:`timeprest.stage.StageRunner`."""

    index: int
    module: nn.Module
    params: list[nn.Parameter]
    device: torch.device

    @property
    def accumulated_grads(self) -> Grads: ...

    precision: str
    loss_scale: float
    clip_norm: float | None
    update_group: UpdateGroup | None


def check_group(
    tied: Sequence[Tied],
    clip_scope: str,
    clip_grad_norm: float | None,
    schedule: str,
    engine: str,
) -> None:
    """ConfigError for a combination whose stages could not agree before their updates."""
    if clip_scope not in CLIP_SCOPES:
        raise ConfigError(f"clip_scope must be one of {', '.join(CLIP_SCOPES)}, got {clip_scope!r}")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ConfigError(f"clip_grad_norm must be a positive number, got {clip_grad_norm}")
    needs = []
    if tied:
        places = "; ".join(" and ".join(f"{n} of stage {s}" for s, n in group) for group in tied)
        needs.append(f"the tied tensor {places}")
    if clip_scope == "global" and clip_grad_norm is not None:
        needs.append("global gradient clipping")
    if not needs:
        return
    what = " and ".join(needs)
    if schedule not in FLUSH_SCHEDULES:
        raise ConfigError(
            f"{what} needs a flush schedule ({', '.join(FLUSH_SCHEDULES)}): under {schedule} a "
            "stage updates before the other stages' backward of the same mini-batch; untie the "
            "embeddings (tie_embeddings=False) or clip per stage (clip_scope='stage')"
        )
    if engine != "emulate":
        raise ConfigError(
            f"{what} sums gradients across stages, which the distributed runtime does not do yet; "
            "use the emulator (--engine emulate)"
        )
    if tied and clip_grad_norm is not None and clip_scope == "stage":
        raise ConfigError(
            f"per-stage clipping would scale the copies of {what.removeprefix('the ')} "
            "differently; use clip_scope='global' with tied tensors"
        )


class UpdateGroup:
    """Local runners that combine their gradients before each update (the emulator)."""

    def __init__(
        self,
        runners: Sequence[StageRunner],
        tied: Sequence[Tied],
        clip_norm: float | None,
    ) -> None:
        self.runners = {r.index: r for r in runners}
        # (stage, index in that runner's params) of every copy of every tied tensor
        self.tied: list[list[tuple[int, int]]] = []
        for group in tied:
            places = []
            for s, name in group:
                runner = self.runners[s]
                target = runner.module.get_parameter(name)
                index = next((i for i, p in enumerate(runner.params) if p is target), None)
                if index is None:
                    raise ConfigError(f"tied tensor {name} of stage {s} is not trained there")
                places.append((s, index))
            self.tied.append(sorted(places))
        self.clip_norm = clip_norm
        if clip_norm is not None:
            self.members = sorted(self.runners)
        else:
            self.members = sorted({s for group in self.tied for s, _ in group})
        self._arrived: dict[int, set[int]] = {}
        self._shares: dict[int, dict[int, Grads]] = {}

    def ready(self, stage: int, t: int) -> bool:
        """Stage ``stage`` is at its update of global mini-batch ``t``: may it run?"""
        if stage not in self.members:
            return True
        arrived = self._arrived.setdefault(t, set())
        arrived.add(stage)
        return len(arrived) == len(self.members)

    def gradients(self, stage: int, t: int, own: Grads) -> Grads:
        """The gradients ``stage`` applies at ``U{t}`` (``own``: what it accumulated)."""
        if stage not in self.members:
            return own
        if t not in self._shares:
            self._shares[t] = self._combine()
        shares = self._shares[t]
        out = shares.pop(stage)
        if not shares:
            del self._shares[t]
            self._arrived.pop(t, None)
        return out

    def _combine(self) -> dict[int, Grads]:
        grads = {s: self.runners[s].accumulated_grads for s in self.members}
        repeated: set[tuple[int, int]] = set()  # later copies: counted once in the norm
        for places in self.tied:
            parts = [g for g in (grads[s][i] for s, i in places) if g is not None]
            if parts:
                total = parts[0].clone()
                for g in parts[1:]:
                    total.add_(g.to(total.device))
                for s, i in places:
                    grads[s][i] = total.to(self.runners[s].device, copy=True)
            repeated.update(places[1:])
        if self.clip_norm is not None:
            clip_together(grads, self.clip_norm, repeated)
        return grads


def clip_together(grads: dict[int, Grads], max_norm: float, repeated: set[tuple[int, int]]) -> None:
    """Scale every gradient in place so their joint 2-norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_`` computes it: the norm of the
    per-tensor norms, and a factor ``max_norm / (norm + 1e-6)`` capped at 1.
    """
    norms = [
        torch.linalg.vector_norm(g).cpu()
        for s, gs in grads.items()
        for i, g in enumerate(gs)
        if g is not None and (s, i) not in repeated
    ]
    if not norms:
        return
    total = torch.linalg.vector_norm(torch.stack(norms))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for gs in grads.values():
        for g in gs:
            if g is not None:
                g.mul_(factor.to(g.device, g.dtype))


def attach_update_rules(
    runners: Sequence[StageRunner],
    *,
    precision: str,
    clip_grad_norm: float | None,
    clip_scope: str,
    tied: Sequence[Tied],
    schedule: str,
    engine: str,
    loss_scale: float | None = None,
) -> None:
    """Give the runners their precision (and fp16's loss scale), clipping and update group
    (docs/design.md section 11)."""
    from timeprest.stage.precision import check_loss_scale, check_precision

    check_group(tied, clip_scope, clip_grad_norm, schedule, engine)
    scale = check_loss_scale(precision, loss_scale)
    for r in runners:
        check_precision(precision, r.device)
        r.precision = precision
        r.loss_scale = scale
        r.clip_norm = clip_grad_norm if clip_scope == "stage" else None
    global_clip = clip_grad_norm if clip_scope == "global" else None
    if tied or global_clip is not None:
        group = UpdateGroup(runners, tied, global_clip)
        for r in runners:
            r.update_group = group
