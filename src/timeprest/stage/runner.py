"""One stage's forward, backward and update: the code both engines run.

The runner computes; it never moves tensors. An engine executes the stage's
lowered program (:mod:`timeprest.schedule.lower`): it receives a tensor,
hands it to :meth:`StageRunner.forward` or :meth:`StageRunner.backward`, and
sends what they return, so the emulator and the distributed runtime compute
bitwise the same thing. How a backward reads other weights than its forward
is in :mod:`timeprest.stage.weights` (docs/design.md section 5).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from timeprest.device import sync_device
from timeprest.errors import NonFiniteLossError
from timeprest.policy.plan import StagePlan
from timeprest.policy.rules import Policy
from timeprest.report import DEFAULT_DISTANCE_EVERY, StageReport, StageStep
from timeprest.schedule.actions import Action
from timeprest.stage.backward import BackwardWeights
from timeprest.stage.checks import checked_forward, checked_loss
from timeprest.stage.fused import FusedLinears
from timeprest.stage.io import Batches
from timeprest.stage.precision import autocast, unscale
from timeprest.stage.remedies import StageRemedies
from timeprest.stage.replicas import GradCombiner
from timeprest.stage.step import step_in_place
from timeprest.stage.weights import (
    Grads,
    Saved,
    buffer_slots,
    call_with,
    microbatch_seed,
    parameter_slots,
    seeded,
    weight_tokens,
)
from timeprest.versions import VersionStore, optimizer_state_bytes, own_counter, tensor_bytes

if TYPE_CHECKING:
    from timeprest.stage.sync import UpdateGroup

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class StageRunner:
    """Runs the actions of stage ``index`` on its module."""

    def __init__(
        self,
        index: int,
        module: nn.Module,
        num_stages: int,
        num_microbatches: int,
        policy: Policy,
        optimizer: OptimizerFactory,
        loss_fn: LossFn | None,
        *,
        seed: int = 0,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        self.index = index
        self.lr_lambda = lr_lambda
        self.module = module
        self.num_stages = num_stages
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.num_microbatches = num_microbatches
        self.policy = policy
        self.loss_fn = loss_fn
        self.seed = seed
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._slots = parameter_slots(module, self.params)
        self.store = VersionStore(self.params)
        self.optimizer: torch.optim.Optimizer | None = (
            optimizer(self.params) if self.params else None
        )
        self._base_lrs = (
            [float(g["lr"]) for g in self.optimizer.param_groups] if self.optimizer else []
        )
        # [remedies] buffers of the staleness remedies (docs/design.md section 12)
        self.remedies = StageRemedies(policy, self.params, self.optimizer)
        first: Tensor | None = next(iter(module.parameters()), None)
        if first is None:
            first = next(iter(module.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._grads: list[Tensor | None] = [None] * len(self.params)
        self._saved: dict[tuple[int, int], Saved] = {}
        # the weights each backward reads, built once per (action, forward version)
        self._backward = BackwardWeights(policy, self.store, self.remedies)
        # nn.Linear weight gradients added into the accumulators in the product (stage/fused.py)
        self.fused = FusedLinears(self._slots)
        self.activation_bytes_live = 0
        self.peak_activation_bytes = 0
        self._checked_input = False
        # saved-activation bytes per input (shape, dtype), counted by the first forward's tokens
        self._activation_bytes: dict[tuple[tuple[int, ...], torch.dtype], int] = {}
        # where the module holds its buffers, for the weight tokens: found again at every
        # schedule (a buffer may be registered between them), read at every forward (a
        # module may replace a buffer in its own forward)
        self._buffer_slots = buffer_slots(module)
        self._has_buffers = bool(self._buffer_slots)
        # per-schedule state, set by begin()
        self.plan: StagePlan | None = None
        self.base_version = 0  # updates applied before the current schedule
        self.base_minibatch = 0  # global index of the schedule's mini-batch 0
        self.losses: dict[int, float] = {}
        self.steps: dict[int, StageStep] = {}
        self.on_loss: Callable[[int, float], None] | None = None
        # (kind, mini-batch, micro-batches, seconds, waiting) of every action run while a
        # list is set here (the profiler's timing; device work is waited for); waiting:
        # the seconds of it its receives spent waiting for a message on its way
        self.action_times: list[tuple[str, int, int, float, float]] | None = None
        # seconds spent inside the transport's receives, while action_times is set (the
        # share of the action times above that was receiving: waiting for a neighbour,
        # and copying the message out), and of it the waiting (Transport.waited)
        self.recv_seconds = 0.0
        self.wait_seconds = 0.0
        self._t0 = 0.0  # start of the action being timed
        self._w0 = 0.0  # wait_seconds at that start
        self._release_at: dict[int, list[int]] = {}  # program index -> versions read last there
        self._last_index = -1  # the index of the schedule's last action
        # docs/design.md section 11, set by the Pipeline: autocast precision, per-stage
        # gradient clipping, and the group this stage combines gradients with before U
        self.precision = "fp32"
        # fp16: the last stage's loss is multiplied by it before the backward, and every
        # stage divides its weight gradients by it (a power of two: exact) as they arrive
        self.loss_scale = 1.0
        self.clip_norm: float | None = None
        self.update_group: UpdateGroup | None = None
        # data parallel (docs/design.md section 10): combines this copy's accumulated
        # gradients with the other replicas' before each update; None with one replica
        self.combine_grads: GradCombiner | None = None
        # the report's relative distance costs a pass over the weights: measured at the
        # mini-batches whose global index is a multiple of this (docs/design.md section 8)
        self.distance_every = DEFAULT_DISTANCE_EVERY

    @property
    def accumulated_grads(self) -> Grads:
        """The gradients accumulated since the last update (None where none arrived)."""
        return list(self._grads)

    def begin(self, plan: StagePlan, base_minibatch: int) -> None:
        """Start a new schedule (the pipeline is drained: only the latest version is held)."""
        assert not self._saved, "a schedule started before the previous one drained"
        self.plan = plan
        # the versions each program index reads for the last time
        self._release_at = {}
        for v, last in plan.keep_until.items():
            self._release_at.setdefault(last, []).append(v)
        self.base_version = self.store.latest
        self.store.drop_views()
        self._buffer_slots = buffer_slots(self.module)
        self._last_index = len(plan.held) - 1  # the program's last action
        # counted again per schedule (the module may have been switched to eval and back)
        self._activation_bytes = {}
        self.base_minibatch = base_minibatch
        self.losses = {}
        self.steps = {}

    # -- actions (the engine's executor calls these, in program order) ---------
    def begin_action(self, index: int, action: Action) -> None:
        """Action ``index`` of the program starts (before its first receive)."""
        if self.action_times is not None:
            sync_device(self.device)
            self._t0 = time.perf_counter()
            self._w0 = self.wait_seconds
        if action.kind == "B":
            # micro-batches of one action often share (forward, backward) versions:
            # build their backward weights and distance once
            self._backward.drop()

    def end_action(self, index: int, action: Action) -> None:
        """Action ``index`` is done (after its last send): release what it last read."""
        assert self.plan is not None
        if action.kind == "B":
            self._backward.drop()
            if self.remedies.corrects:  # [remedies] corrected gradients join the update's
                for grads in self.remedies.flush(self.store.get, self.store.latest):
                    self._accumulate(grads)
        for v in self._release_at.get(index, ()):
            self.store.release(self.base_version + v)
        if index == self._last_index:  # drained: the spare tensors go
            self.store.pool.clear()
        if self.action_times is not None:
            sync_device(self.device)
            count = len(action.microbatches(self.num_microbatches)) if action.kind == "B" else 1
            self.action_times.append(
                (
                    action.kind,
                    self.base_minibatch + action.minibatch,
                    count,
                    time.perf_counter() - self._t0,
                    self.wait_seconds - self._w0,
                )
            )

    # -- forward ---------------------------------------------------------------
    def _rng(self, t: int, j: int) -> contextlib.AbstractContextManager[Any]:
        return seeded(
            self.device, microbatch_seed(self.seed, self.index, self.base_minibatch + t, j)
        )

    def _call(self, weights: list[Tensor], x: Tensor) -> Tensor:
        return call_with(self.module, self._slots, self.params, weights, x)

    def forward(self, t: int, j: int, received: Tensor | None, batches: Batches) -> Tensor | None:
        """``F{t}.{j}`` on the received activation (stage 0: the input); the output to send.

        Returns None at the last stage (its output is the loss, kept for the backward).
        """
        assert self.plan is not None
        if self.is_first:
            x = batches.input(t, j).to(self.device, non_blocking=True)
        else:
            assert received is not None
            x = received.detach().requires_grad_()
        v = self.base_version + self.plan.forward_version[(t, j)]
        weights = self.store.get(v)
        d = self.plan.staleness(t, j)  # [remedies] a predicted forward aims d versions ahead
        frac = batches.fraction(t, j) if self.is_last else 1.0
        target = batches.target(t, j).to(self.device, non_blocking=True) if self.is_last else None
        sent: Tensor | None = None
        if self.policy.grad_rule == "recompute":
            weights, extra = self.remedies.predicted(weights, d)
            self.store.observe(extra)
            with torch.no_grad(), self._rng(t, j), autocast(self.device, self.precision):
                out = self._checked_call(weights, x)
                if self.is_last:
                    loss = self._loss(out, target, t, j)
            saved = Saved(x.detach(), None, [], v, tensor_bytes([x]), target=target, fraction=frac)
            if self.is_last:
                self._record_loss(t, j, loss, frac)
            else:
                sent = out.detach()
        else:
            # the backward reads what autograd would keep: the forward's tensors (d = 0), or
            # the live storage this forward read, updated in place to the backward's k
            # (a latest backward, float32): then no tokens (they cost as much as the
            # forward at small sizes); buffers (BatchNorm statistics) still need them
            same = self.precision == "fp32" and (
                d == 0 or self._reads_live_at_backward(t, j, v, d)
            )  # under autocast autograd would keep a cast of every weight: tokens
            if same and d > 0:  # autograd's check must not see the updates in between
                leaves = [own_counter(w).requires_grad_() for w in weights]
            else:
                leaves = [w.detach().requires_grad_() for w in weights]
            reads, extra = self.remedies.predicted(leaves, d)
            if extra:
                self.store.observe(extra)
            saved = Saved(x if not self.is_first else None, None, leaves, v, 0)
            shape = (tuple(x.shape), x.dtype)
            known = self._activation_bytes.get(shape)
            tokens = not same or self._has_buffers or known is None
            fuse = self._fuses(t, j, v, reads is leaves)
            if tokens or fuse or self.precision != "fp32":
                hooks = (
                    torch.autograd.graph.saved_tensors_hooks(
                        *weight_tokens(saved, self.module, reads, buffers=self._buffers())
                    )
                    if tokens
                    else contextlib.nullcontext()
                )
                with (
                    hooks,
                    self._rng(t, j),
                    autocast(self.device, self.precision),
                    self.fused.forward(leaves) if fuse else contextlib.nullcontext() as record,
                ):
                    out, mb_loss = self._forward_call(reads, x, target, t, j, frac)
                if record is not None:
                    saved.fused = self.fused.after(record, out)
            else:  # the common case, without the three no-op contexts (~2 us a forward)
                with self._rng(t, j):
                    out, mb_loss = self._forward_call(reads, x, target, t, j, frac)
            if mb_loss is not None:
                self._record_loss(t, j, mb_loss, frac)
            else:
                sent = out.detach()
            saved.out = out
            if tokens:  # the saved bytes of this input shape, for the forwards without tokens
                self._activation_bytes.setdefault(shape, saved.activation_bytes)
            else:
                saved.activation_bytes = known or 0
        self._saved[(t, j)] = saved
        self.activation_bytes_live += saved.activation_bytes
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.activation_bytes_live)
        step = self._step(t)
        step.forward_versions.append(v)
        return sent

    def _buffers(self) -> list[Tensor]:
        """The module's buffers as they are now."""
        found = (m._buffers.get(name) for m, name in self._buffer_slots)
        return [b for b in found if b is not None]

    def _step(self, t: int) -> StageStep:
        step = self.steps.get(t)
        if step is None:
            step = self.steps[t] = StageStep()
        return step

    def _fuses(self, t: int, j: int, v: int, plain_reads: bool) -> bool:
        """Whether F{t}.{j}'s nn.Linear weight gradients can be added in the product: its
        backward will add into the accumulators (:meth:`_backward_into_accumulators`).

        Not the micro-batch of mini-batch t backpropagated first here
        (``StagePlan.first_backward``: micro-batch 0 in most schedules, the last one in
        GPipe's): that backward, the first after an update, writes fresh gradients, the
        same product either way, so fusing it would only add the hooks' cost (and with
        N = 1 nothing is ever added). Either choice gives the same numbers; this one is
        only the cheaper."""
        assert self.plan is not None
        if j == self.plan.first_backward.get(t, 0) or not self.fused:
            return False
        if not plain_reads or self.precision != "fp32":
            return False
        k = self.base_version + self.plan.backward_version[(t, j)]
        return self.loss_scale == 1.0 and not (self.remedies.corrects and v != k)

    def _reads_live_at_backward(self, t: int, j: int, v: int, d: int) -> bool:
        """Whether F{t}.{j}'s backward (d > 0) reads the very tensors this live forward
        reads, as they will be then (:meth:`StagePlan.backward_reads_forward_tensors`)."""
        assert self.plan is not None
        if v != self.store.latest or self.remedies.predicts:  # autograd keeps the weights
            return False
        return self.plan.backward_reads_forward_tensors(t, j, self.policy)

    def _forward_call(
        self, reads: list[Tensor], x: Tensor, target: Tensor | None, t: int, j: int, frac: float
    ) -> tuple[Tensor, Tensor | None]:
        """The stage's module on ``reads``; at the last stage (root to backpropagate, loss),
        elsewhere (output, None)."""
        out = self._checked_call(reads, x)
        if not self.is_last:
            return out, None
        loss = self._loss(out, target, t, j)
        return self._backward_root(loss, frac), loss

    def _checked_call(self, weights: list[Tensor], x: Tensor) -> Tensor:
        if self._checked_input:
            return self._call(weights, x)
        out = checked_forward(self.index, lambda inp: self._call(weights, inp), x)
        self._checked_input = True
        return out

    def _loss(self, out: Tensor, target: Tensor | None, t: int, j: int) -> Tensor:
        assert self.loss_fn is not None and target is not None
        return checked_loss(self.index, self.loss_fn, out, target)

    def _backward_root(self, loss: Tensor, frac: float) -> Tensor:
        """What the last stage backpropagates: its share of the mini-batch's loss (section 7),
        times fp16's loss scale."""
        root = loss * frac
        return root * self.loss_scale if self.loss_scale != 1.0 else root

    def _record_loss(self, t: int, j: int, loss: Tensor, frac: float) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at mini-batch {self.base_minibatch + t} (micro-batch {j}): "
                "training stopped; try a lower learning rate"
            )
        self.losses[t] = self.losses.get(t, 0.0) + frac * value
        if j == self.num_microbatches - 1 and self.on_loss is not None:
            self.on_loss(self.base_minibatch + t, self.losses[t])

    # -- backward --------------------------------------------------------------
    def backward(self, t: int, j: int, grad_out: Tensor | None) -> Tensor | None:
        """Micro-batch j of mini-batch t's backward, on the output gradient received (None
        at the last stage); returns the input gradient to send (None at stage 0)."""
        assert self.plan is not None
        saved = self._saved.pop((t, j))
        v = saved.version
        k = self.store.latest
        assert k - self.base_version == self.plan.backward_version[(t, j)]
        measure = (self.base_minibatch + t) % self.distance_every == 0
        weights, transient, dist = self._backward.get(v, k, self.base_version, measure)
        if transient:  # what is held now was observed when it changed (stash, update)
            self.store.observe(transient)
        want_dx = not self.is_first
        grads: list[Tensor | None]
        dx: Tensor | None
        if not want_dx and not self.params:  # a first stage with nothing to train
            grads, dx = [], None
        elif self.policy.grad_rule == "recompute":
            grads, dx = self._recompute_grads(saved, weights, grad_out, t, j, want_dx)
        elif self.loss_scale == 1.0 and not (self.remedies.corrects and v != k):
            saved.backward_weights = weights
            dx = self._backward_into_accumulators(saved, grad_out, want_dx)
            grads = []
        else:  # the micro-batch's own gradients: unscaled, or held for a correction
            saved.backward_weights = weights
            inputs = list(saved.leaves) + ([saved.x] if want_dx and saved.x is not None else [])
            assert saved.out is not None
            res = torch.autograd.grad(saved.out, inputs, grad_outputs=grad_out, allow_unused=True)
            grads, dx = list(res[: len(saved.leaves)]), (res[-1] if want_dx else None)
            del res
        if self.loss_scale != 1.0:
            grads = unscale(grads, self.loss_scale, self.index, self.base_minibatch + t)
        if self.remedies.corrects and v != k:  # [remedies] corrected when the action ends
            self.remedies.defer(v, grads)
        elif grads:
            self._accumulate(grads, dx)
        if want_dx and dx is None:
            assert saved.x is not None
            dx = torch.zeros_like(saved.x)
        self.activation_bytes_live -= saved.activation_bytes
        step = self._step(t)
        step.backward_version = k
        step.staleness.append(k - v)
        n_done = len(step.staleness)
        if dist is None or step.relative_distance is None:
            step.relative_distance = None  # not measured at this mini-batch
        else:
            step.relative_distance += (dist - step.relative_distance) / n_done
        return dx if want_dx else None

    def _backward_into_accumulators(
        self, saved: Saved, grad_out: Tensor | None, want_dx: bool
    ) -> Tensor | None:
        """The backward with each weight's gradient added into the stage's accumulator by
        autograd itself, as soon as it is computed (the same ``add_`` as
        :meth:`_accumulate`, so the same values; a first gradient laid out unlike its
        parameter is copied to the parameter's layout, and one that is also another
        output, such as the input gradient, is copied rather than taken); the input
        gradient is returned.

        Autograd frees each micro-batch gradient right after adding it, one at a time; a
        backward that returned them all (``autograd.grad``) and freed them together made
        the C allocator give the memory back to the system and fault it in again, page by
        page, at every micro-batch: at 3 x 2048^2 weights that doubled the backward.
        """
        assert saved.out is not None
        leaves = saved.leaves
        for leaf, acc in zip(leaves, self._grads):
            leaf.grad = acc
        x = saved.x if want_dx else None
        inputs = [*leaves, x] if x is not None else list(leaves)
        try:
            torch.autograd.backward(saved.out, grad_tensors=grad_out, inputs=inputs)
            if saved.fused is not None:
                saved.fused.check_backward()
            self._grads = [leaf.grad for leaf in leaves]
            dx = None if x is None else x.grad
        finally:  # the leaves must not keep the accumulators (nor a half-done sum)
            if saved.fused is not None:
                saved.fused.unhook()
            for leaf in leaves:
                leaf.grad = None
            if x is not None:
                x.grad = None
        return dx

    def _accumulate(self, grads: list[Tensor | None], dx: Tensor | None = None) -> None:
        """Add a micro-batch's gradients to the accumulators; a first gradient becomes its
        accumulator unless it is also another output (the input gradient ``dx``, another
        weight's gradient): then a copy does, so no later ``add_`` changes that output."""
        taken = {id(dx)} if dx is not None else set()
        for i, g in enumerate(grads):
            if g is None:
                continue
            acc = self._grads[i]
            if acc is None:
                self._grads[i] = g.clone() if id(g) in taken else g
                taken.add(id(g))
            else:
                acc.add_(g)

    def _recompute_grads(
        self,
        saved: Saved,
        weights: list[Tensor],
        grad_out: Tensor | None,
        t: int,
        j: int,
        want_dx: bool,
    ) -> tuple[list[Tensor | None], Tensor | None]:
        assert saved.x is not None
        x = saved.x.detach().requires_grad_(want_dx)
        leaves = [w.detach().requires_grad_() for w in weights]
        buffers = [b.detach().clone() for b in self.module.buffers()]
        with torch.enable_grad(), self._rng(t, j), autocast(self.device, self.precision):
            out = self._call(leaves, x)
            if self.is_last:
                out = self._backward_root(self._loss(out, saved.target, t, j), saved.fraction)
        inputs = leaves + ([x] if want_dx else [])
        res = torch.autograd.grad(out, inputs, grad_outputs=grad_out, allow_unused=True)
        with torch.no_grad():  # the replayed forward must not count twice in BatchNorm statistics
            for b, old in zip(self.module.buffers(), buffers):
                b.copy_(old)
        return list(res[: len(leaves)]), (res[-1] if want_dx else None)

    # -- update ----------------------------------------------------------------
    def update_ready(self, t: int) -> bool:
        """Whether ``U{t}`` can run now: its update group (if any) has all its gradients."""
        group = self.update_group
        return group is None or group.ready(self.index, self.base_minibatch + t)

    def update(self, index: int, t: int) -> None:
        """``U{t}`` (action ``index``): one optimizer step with the accumulated gradient."""
        assert self.plan is not None
        stash = index in self.plan.stash_at  # keep the version this update replaces
        if stash and self.optimizer is None:
            self.store.stash_latest()
        grads = self._grads
        if self.combine_grads is not None and self.optimizer is not None:
            grads = self.combine_grads(t, grads)  # data parallel: the whole mini-batch's
        if self.update_group is not None:  # tied copies summed, the global norm clipped
            grads = self.update_group.gradients(self.index, self.base_minibatch + t, grads)
        if self.optimizer is not None:
            lr_rule = self.policy.lr_rule  # [remedies] PipeMare's per-stage learning rate
            if self.lr_lambda is not None or lr_rule.kind != "constant":
                factor = self.lr_lambda(self.base_minibatch + t) if self.lr_lambda else 1.0
                tau = self.plan.mean_staleness(t, self.num_microbatches)
                factor *= lr_rule.factor(self.base_minibatch + t, tau)
                for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                    group["lr"] = base * factor
            step_in_place(
                self.optimizer,
                self.params,
                grads,
                self.clip_norm,
                self.remedies,
                self.store if stash else None,
                spend_grads=grads is self._grads,  # its own: nothing reads them after
            )
        self._grads = [None] * len(self.params)
        self.store.advance()
        self.store.observe()

    # -- figures -----------------------------------------------------------------
    def optimizer_state_bytes(self) -> int:
        return optimizer_state_bytes(self.optimizer) + self.remedies.direction_bytes

    def report(self) -> StageReport:
        """This stage's memory figures and version counter (docs/design.md section 8)."""
        return StageReport(
            stage=self.index,
            weight_bytes=self.store.bytes_per_version,
            peak_versions=self.store.peak_versions,
            peak_weight_bytes=self.store.peak_bytes,
            peak_activation_bytes=self.peak_activation_bytes,
            optimizer_state_bytes=self.optimizer_state_bytes(),
            updates=self.store.latest,
            extra_buffers=self.remedies.buffers,
            extra_buffer_bytes=self.remedies.buffer_bytes,
        )
