"""The tensor side of the staleness remedies at one stage (docs/design.md section 12).

The policy parts (:mod:`timeprest.policy.remedies`) are numbers; this module
holds what they need between actions and computes with it:

- weight prediction: ``w_v - d * eta * u`` from the optimizer's step
  direction ``u`` (one adapter per optimizer family, :func:`step_direction`);
- the velocity ``delta`` of the velocity backward rules, updated after every
  step from the step itself;
- the gradient corrections (``dc``, ``gap-aware``): a backward's gradients are
  summed per forward version, corrected with ``w_k - w_v`` when the backward
  action ends (the stashed version is still held then), and only then added to
  the gradient of the update; ``gap-aware`` keeps a running average of the
  squared step direction ``u`` and the largest learning rate used.

The stage runner calls it from a few marked places; the degree of staleness
``d`` always comes from the version plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from timeprest.errors import ConfigError
from timeprest.policy.rules import VELOCITY_RULES, Policy
from timeprest.stage.weights import Grads
from timeprest.versions import tensor_bytes

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW")


def check_predictable(optimizer: torch.optim.Optimizer) -> None:
    """Raise ConfigError unless weight prediction can read ``optimizer``'s step direction."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
        raise ConfigError(
            f"forward rule 'predicted' needs the optimizer's step direction: supported "
            f"optimizers are {', '.join(SUPPORTED_OPTIMIZERS)}, got {name}"
        )
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ConfigError(f"forward rule 'predicted' does not support {name}(maximize=True)")
        if isinstance(optimizer, torch.optim.SGD) and group.get("nesterov", False):
            raise ConfigError(
                "forward rule 'predicted' does not support SGD(nesterov=True): its step is not "
                "a stored direction; use plain momentum"
            )


def step_direction(
    optimizer: torch.optim.Optimizer, p: Tensor, group: dict[str, Any], last_grad: Tensor | None
) -> Tensor | None:
    """``u`` such that the next step is about ``w <- w - lr * u``; None before any step.

    SGD with momentum: PyTorch's ``momentum_buffer``; SGD without momentum: the
    last applied gradient (plus weight decay); Adam and AdamW:
    ``m_hat / (sqrt(v_hat) + eps)`` with bias correction (AdamW adds its
    decoupled decay ``weight_decay * w``).
    """
    state = optimizer.state.get(p, {})
    if isinstance(optimizer, torch.optim.SGD):
        if group["momentum"] != 0:
            buf = state.get("momentum_buffer")
            return None if buf is None else buf
        if last_grad is None:
            return None
        wd = group["weight_decay"]
        return last_grad if wd == 0 else last_grad + wd * p.detach()
    if "exp_avg" not in state:
        return None
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    m_hat = state["exp_avg"] / (1.0 - beta1**step)
    u = m_hat / ((v / (1.0 - beta2**step)).sqrt() + group["eps"])
    if isinstance(optimizer, torch.optim.AdamW) and group["weight_decay"] != 0:
        u = u + group["weight_decay"] * p.detach()
    return u


class StageRemedies:
    """Buffers and computations of the remedies of one stage's policy."""

    def __init__(
        self, policy: Policy, params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None
    ) -> None:
        self.policy = policy
        self.params = params
        self.optimizer = optimizer
        self.predicts = policy.forward == "predicted" and optimizer is not None
        self.corrects = policy.correction.active  # gradient corrections (read per backward)
        if self.predicts:
            assert optimizer is not None
            check_predictable(optimizer)
        self._group: list[dict[str, Any]] = []
        if optimizer is not None:
            where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            self._group = [where[id(p)] for p in params]
        zeros = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        velocity = policy.backward in VELOCITY_RULES
        gap = policy.correction.kind == "gap-aware"
        self.delta: list[Tensor] | None = [z.detach() for z in zeros] if velocity else None
        self.sq_steps: list[Tensor] | None = [z.detach().clone() for z in zeros] if gap else None
        self.steps = 0  # updates seen by sq_steps (its bias correction)
        self.max_lrs: list[float] = [0.0] * len(params) if gap else []  # Gap-Aware's eta_max
        self.last_grads: Grads | None = None  # momentum-free SGD's direction
        self._pending: dict[int, Grads] = {}  # corrections: forward version -> summed gradients

    # -- forward: weight prediction ------------------------------------------------
    def predicted(self, weights: list[Tensor], d: int) -> tuple[list[Tensor], int]:
        """The forward weights ``w - d * eta * u`` and their bytes (``weights`` when d = 0).

        Under grad mode on leaves the result stays differentiable to them (``leaf +
        offset``, an addition that saves nothing), so the graph rule's weight tokens
        can swap it for the backward weights.
        """
        if not self.predicts or d == 0:
            return weights, 0
        assert self.optimizer is not None
        out: list[Tensor] = []
        for i, w in enumerate(weights):
            group = self._group[i]
            grad = self.last_grads[i] if self.last_grads is not None else None
            with torch.no_grad():
                u = step_direction(self.optimizer, self.params[i], group, grad)
                offset = None if u is None else u * (-d * float(group["lr"]))
            # no direction yet (before the first update): the same values, in the
            # tensor the version plan counts for every forward with d > 0
            out.append(w + 0.0 if offset is None else w + offset)
        return out, tensor_bytes(out)

    # -- backward weights: the velocity rules -------------------------------------------
    def velocity_weights(self, latest: list[Tensor], d: int) -> tuple[list[Tensor], int]:
        """``w_k - c * delta`` (c = d, or sigma(d) * d) and its bytes; ``latest`` when c = 0."""
        c = self.policy.velocity_scale(d)
        if c == 0.0 or self.delta is None:
            return latest, 0
        with torch.no_grad():
            out = [w - c * dl for w, dl in zip(latest, self.delta)]
        return out, tensor_bytes(out)

    # -- gradient corrections ------------------------------------------------------------
    @property
    def reads_grads_after_step(self) -> bool:
        """Whether :meth:`after_step` reads the step's gradients (weight prediction keeps
        them, Gap-Aware measures the step with them)."""
        return self.predicts or self.sq_steps is not None

    def defer(self, v: int, grads: Grads) -> None:
        """Hold a stale micro-batch's gradients (forward version v) until the action ends."""
        acc = self._pending.get(v)
        if acc is None:
            self._pending[v] = list(grads)
            return
        for i, g in enumerate(grads):
            if g is not None:
                acc[i] = g if acc[i] is None else acc[i].add_(g)  # type: ignore[union-attr]

    def flush(self, weights_of: Callable[[int], list[Tensor]], k: int) -> list[Grads]:
        """The held gradients, corrected with ``w_k - w_v`` per forward version v."""
        cor = self.policy.correction
        latest = weights_of(k)
        out: list[Grads] = []
        for v in sorted(self._pending):
            grads = self._pending[v]
            stale = weights_of(v)
            fixed: Grads = []
            with torch.no_grad():
                for i, g in enumerate(grads):
                    if g is None:
                        fixed.append(None)
                        continue
                    gap = latest[i] - stale[i]
                    if cor.kind == "dc":
                        fixed.append(g + cor.dc_lambda * g * g * gap)
                    else:
                        fixed.append(g / (1.0 + gap.abs() / self._typical_step(i)))
            out.append(fixed)
        self._pending = {}
        return out

    def _typical_step(self, i: int) -> Tensor | float:
        """Gap-Aware's C: ``eta_max * (sqrt(r / (1 - beta**n)) + eps)`` (docs/design.md 12).

        Infinite (no correction) when ``gap_eps`` is, and before any update has
        moved the weights (n = 0 or eta_max = 0), where every gap is 0 anyway and
        a C of 0 would turn ``0 / 0`` into NaN.
        """
        cor = self.policy.correction
        if math.isinf(cor.gap_eps) or self.sq_steps is None:
            return math.inf
        eta = self.max_lrs[i]
        if self.steps == 0 or eta == 0.0:
            return math.inf
        bias = 1.0 - cor.gap_beta**self.steps
        return ((self.sq_steps[i] / bias).sqrt() + cor.gap_eps) * eta

    # -- update ---------------------------------------------------------------------------
    def before_step(self, grads: Grads) -> None:
        """Start folding the coming step into delta (Gap-Aware measures it in :meth:`after_step`).

        No copy of the weights is made: ``delta <- gamma * delta + (1 - gamma) * (w_new -
        w_old)`` is applied as ``- (1 - gamma) * w_old`` now and ``+ (1 - gamma) * w_new``
        in :meth:`after_step`.
        """
        gamma = self.policy.velocity.gamma
        if self.delta is not None:
            with torch.no_grad():
                for dl, p in zip(self.delta, self.params):
                    dl.mul_(gamma).sub_(p.detach(), alpha=1.0 - gamma)

    def after_step(self, grads: Grads) -> None:
        """Finish delta with the new weights; keep momentum-free SGD's gradient; measure the step.

        Gap-Aware's typical step is the direction ``u`` the optimizer has just
        stepped along (:func:`step_direction`, read after the step) and the rate
        it used: ``r <- beta * r + (1 - beta) * u**2``, ``n <- n + 1``,
        ``eta_max <- max(eta_max, lr)``. A parameter without a gradient was not
        moved: its sample is 0.
        """
        if self.predicts and isinstance(self.optimizer, torch.optim.SGD):
            if any(g["momentum"] == 0 for g in self.optimizer.param_groups):
                self.last_grads = list(grads)
        with torch.no_grad():
            if self.delta is not None:
                gamma = self.policy.velocity.gamma
                for dl, p in zip(self.delta, self.params):
                    dl.add_(p.detach(), alpha=1.0 - gamma)
            if self.sq_steps is not None and self.optimizer is not None:
                self._measure_step(self.optimizer, grads)

    def _measure_step(self, optimizer: torch.optim.Optimizer, grads: Grads) -> None:
        assert self.sq_steps is not None
        beta = self.policy.correction.gap_beta
        for i, (r, p, g) in enumerate(zip(self.sq_steps, self.params, grads)):
            group = self._group[i]
            r.mul_(beta)
            u = None if g is None else step_direction(optimizer, p, group, g)
            if u is not None:
                r.addcmul_(u, u, value=1.0 - beta)
            self.max_lrs[i] = max(self.max_lrs[i], float(group["lr"]))
        self.steps += 1

    # -- figures and state -------------------------------------------------------------------
    @property
    def buffer_bytes(self) -> int:
        """Bytes of the weight-sized buffers kept between updates (delta, running average)."""
        return tensor_bytes(self.delta or []) + tensor_bytes(self.sq_steps or [])

    @property
    def buffers(self) -> int:
        return int(self.delta is not None) + int(self.sq_steps is not None)

    @property
    def direction_bytes(self) -> int:
        """The last gradient kept as momentum-free SGD's step direction (optimizer-like state)."""
        return tensor_bytes([g for g in self.last_grads or [] if g is not None])

    def state_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "sq_steps": self.sq_steps,
            "steps": self.steps,
            "max_lrs": self.max_lrs,
            "last_grads": self.last_grads,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict: a checkpoint without remedies)."""
        for name in ("delta", "sq_steps"):
            mine: list[Tensor] | None = getattr(self, name)
            theirs = state.get(name)
            if mine is None or theirs is None:
                continue
            if len(theirs) != len(mine):
                raise ConfigError(
                    f"the checkpoint's {name} has {len(theirs)} tensors, not {len(mine)}"
                )
            with torch.no_grad():
                for a, b in zip(mine, theirs):
                    a.copy_(b)
        self.steps = int(state.get("steps", 0))
        if self.sq_steps is not None and state.get("sq_steps") is not None:
            lrs = state.get("max_lrs")
            if lrs is None:
                raise ConfigError(
                    "the checkpoint's Gap-Aware state has no largest learning rate per tensor "
                    "(written before C measured the optimizer's step): resume without "
                    "correction gap-aware, or train again"
                )
            self.max_lrs = [float(x) for x in lrs]
        grads = state.get("last_grads")
        self.last_grads = None if grads is None else list(grads)
