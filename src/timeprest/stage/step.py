"""One optimizer step of a stage, on the gradients the runner accumulated.

Around the step the stage gives each parameter its gradient, clips, and lets
the remedies measure the step (docs/design.md section 12). The step itself is
the user's optimizer, except for torch's plain SGD, whose arithmetic
:func:`sgd_into` carries out directly (the same operations, so the same
numbers): in place, or, at an update the plan stashes, into new tensors so
that the old version needs no copy. Every other update stays in place:
forwards without weight tokens hold the live storage and read the update
through it (docs/design.md section 5), so an optimizer that assigns
``p.data`` instead has its new values written back into that storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.optim.optimizer as _optim
from torch import Tensor, nn

from timeprest.stage.remedies import StageRemedies
from timeprest.stage.weights import Grads
from timeprest.versions import BufferPool, VersionStore


def step_in_place(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    grads: Grads,
    clip_norm: float | None,
    remedies: StageRemedies,
    stash: VersionStore | None = None,
    spend_grads: bool = False,
) -> None:
    """``optimizer.step()`` with ``grads`` (None: no gradient), the parameters left in
    their storage, the gradients cleared after.

    With ``stash``, the version before the step is kept in ``stash`` first (the plan
    stashes it here). A plain SGD then writes the new weights straight into pool tensors
    and the parameters move there (:func:`sgd_into`: no copy of the old version, which
    stays where it is); any other optimizer steps a copy in place. Without ``stash`` a
    plain SGD is stepped in place by :func:`sgd_into` too (its arithmetic without the
    wrapper around ``Optimizer.step``, which costs as much as the step itself on small
    weights); any other optimizer by its own ``step``.

    ``spend_grads``: ``grads`` are the caller's own (no data-parallel sum or update group
    made them), read by nothing after the step, so a stashing plain SGD may write the new
    weights into them (:func:`sgd_into`).
    """
    for p, g in zip(params, grads):
        p.grad = g
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    remedies.before_step(grads)  # [remedies] the step is measured
    spend = spend_grads and not remedies.reads_grads_after_step
    stepped = sgd_into(optimizer, params, stash.pool if stash is not None else None, spend)
    if stash is not None:
        stash.stash_latest(stepped)
    if stepped is None:
        live: list[Tensor] = [p.detach() for p in params]
        optimizer.step()
        for p, before in zip(params, live):
            if p.data_ptr() != before.data_ptr():
                before.copy_(p.detach())
                p.data = before
    if stepped is None:
        optimizer.zero_grad(set_to_none=True)
    else:  # what zero_grad(set_to_none=True) does, without its wrappers (~50 us a call)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    remedies.after_step(grads)


_TORCH_ZERO_GRAD = torch.optim.Optimizer.zero_grad  # what the fast path does in its place


def _plain_sgd_groups(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]
) -> list[dict[str, Any]] | None:
    """Each parameter's group when ``optimizer`` is torch's own SGD, stepped as it is
    written (no hooks, no wrapper of its ``step`` or ``zero_grad``, float learning rates, dense CPU
    gradients, neither differentiable nor fused); else None."""
    if type(optimizer) is not torch.optim.SGD or {"step", "zero_grad"} & vars(optimizer).keys():
        return None
    if torch.optim.SGD.zero_grad is not _TORCH_ZERO_GRAD:  # patched on the class
        return None
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return None
    if _optim._global_optimizer_pre_hooks or _optim._global_optimizer_post_hooks:
        return None
    groups = optimizer.param_groups
    for group in groups:
        if group.get("differentiable") or group.get("fused") or type(group["lr"]) is not float:
            return None
    for p in params:
        g = p.grad
        if not p.is_cpu or (g is not None and (g.is_sparse or not g.is_cpu)):
            return None
    if len(groups) == 1:  # the stage's own optimizer(params): one group of exactly these
        only = groups[0]["params"]
        if len(only) == len(params) and all(a is b for a, b in zip(only, params)):
            return [groups[0]] * len(params)
    by_param: dict[int, dict[str, Any]] = {}
    for group in groups:
        for p in group["params"]:
            by_param[id(p)] = group
    if any(id(p) not in by_param for p in params):
        return None
    return [by_param[id(p)] for p in params]


def sgd_into(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    pool: BufferPool | None,
    spend_grads: bool = False,
) -> list[Tensor] | None:
    """One step of torch's SGD; None (and nothing done) when the optimizer is not plain SGD.

    The same arithmetic as ``torch.optim.SGD.step`` on a CPU, operation for operation
    (maximize, weight decay, the momentum buffer in the optimizer's state, dampening,
    Nesterov, then ``param.add_(d_p, alpha=-lr)``). With ``pool`` that last sum is
    written into a pool tensor instead, for each parameter, and those tensors are
    returned: the same numbers, with the parameters and their storage untouched (a
    parameter without a gradient is copied: SGD leaves it as it is). Without ``pool``
    the parameters are updated in place, as torch's step does, and [] is returned.

    With ``pool`` and ``spend_grads`` (the gradients are the caller's, read by nothing
    after the step, dense, and no two sharing storage), a parameter whose step is its
    gradient itself (no momentum, weight decay or maximize), laid out as the parameter,
    gets its new weights written into that gradient instead, and the pool tensor it
    would have written goes (the pool gets the old version back when it is released,
    so it stays the size it was).
    Element by element the same sum; what it saves is memory traffic: a pool
    tensor was last touched long ago, so writing it first reads it into the cache,
    while the gradient has just been read (at 3 x 1024^2 weights, one thread: 0.45
    against 0.63 ms, about what an in-place step costs).
    """
    groups = _plain_sgd_groups(optimizer, params)
    if groups is None:
        return None
    spend_grads = spend_grads and pool is not None and _own_storages([p.grad for p in params])
    out: list[Tensor] = []
    with torch.no_grad():
        for p, group in zip(params, groups):
            w = p.detach()
            fresh = pool.take(w) if pool is not None else w
            if p.grad is None:
                if pool is not None:
                    fresh.copy_(w)
                    out.append(fresh)
                continue
            d_p = p.grad if not group["maximize"] else -p.grad
            if group["weight_decay"] != 0:
                d_p = d_p.add(w, alpha=group["weight_decay"])
            momentum = group["momentum"]
            if momentum != 0:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = d_p.detach().clone()
                else:
                    buf.mul_(momentum).add_(d_p, alpha=1 - group["dampening"])
                state["momentum_buffer"] = buf
                d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
            if pool is None:
                w.add_(d_p, alpha=-group["lr"])
            elif spend_grads and d_p is p.grad and _same_layout(d_p, w):
                del fresh  # the pool tensor taken goes (the pool stays the size it was)
                torch.add(w, d_p, alpha=-group["lr"], out=d_p)
                out.append(d_p)
            else:
                torch.add(w, d_p, alpha=-group["lr"], out=fresh)
                out.append(fresh)
    return out


def _own_storages(grads: Sequence[Tensor | None]) -> bool:
    """Whether ``grads`` are dense and no two share storage (each may then be written)."""
    if any(g is not None and g.layout != torch.strided for g in grads):
        return False
    ptrs = [g.untyped_storage().data_ptr() for g in grads if g is not None]
    return len(set(ptrs)) == len(ptrs)


def _same_layout(g: Tensor, w: Tensor) -> bool:
    """Whether dense gradient ``g`` can hold ``w``'s next version: a tensor of its own
    storage, shaped, strided and typed as ``w``."""
    return (
        g.dtype == w.dtype
        and g.device == w.device
        and g.shape == w.shape
        and g.stride() == w.stride()
        and g._base is None
        and g.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    )
