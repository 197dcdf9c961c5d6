"""One optimizer step of a stage, on the gradients the runner accumulated.

The step runs the user's optimizer unchanged; around it the stage gives each
parameter its gradient, clips, lets the remedies measure the step
(docs/design.md section 12), and keeps every update in place: forwards
without weight tokens hold the live storage and read the update through it
(docs/design.md section 5), so an optimizer that assigns ``p.data`` instead
of updating in place has its new values written back into that storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from timeprest.stage.remedies import StageRemedies
from timeprest.stage.weights import Grads


def step_in_place(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    grads: Grads,
    clip_norm: float | None,
    remedies: StageRemedies,
) -> None:
    """``optimizer.step()`` with ``grads`` (None: no gradient), the parameters left in
    their storage, the gradients cleared after."""
    for p, g in zip(params, grads):
        p.grad = g
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    remedies.before_step(grads)  # [remedies] the step is measured
    live: list[Tensor] = [p.detach() for p in params]
    optimizer.step()
    for p, before in zip(params, live):
        if p.data_ptr() != before.data_ptr():
            before.copy_(p.detach())
            p.data = before
    optimizer.zero_grad(set_to_none=True)
    remedies.after_step(grads)
