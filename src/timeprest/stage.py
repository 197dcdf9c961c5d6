"""One stage's forward, backward and update: the code both engines run.

The engines differ only in the :class:`Transport` that moves activations and
gradients between stages; the numerics live here, so the emulator and the
distributed runtime compute bitwise the same thing.

How a backward reads other weights than its forward (DESIGN section 5): the
forward runs the stage's module with its parameters swapped for fresh leaf
tensors that hold the forward version (what :func:`torch.func.functional_call`
does, with the parameter slots found once instead of at every call). While it
runs, a
``saved_tensors_hooks`` pair replaces every saved tensor that lives in one of
those weight tensors with a token; at the backward the token unpacks to the
same view of the *backward* weights. So ``dW = delta^T x`` uses the saved
activations and ``dx = delta W_b`` the backward weights, and autograd never
holds the live parameters that the optimizer updates in place.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from timeprest.device import sync_device
from timeprest.errors import NonFiniteLossError, ShapeError
from timeprest.policy.plan import StagePlan
from timeprest.policy.rules import Policy
from timeprest.report import StageStep
from timeprest.schedule.actions import Action
from timeprest.versions import VersionStore, optimizer_state_bytes, tensor_bytes

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Transport(Protocol):
    """Moves tensors between neighbouring stages; keys are (minibatch, microbatch)."""

    def send_activation(self, stage: int, t: int, j: int, x: Tensor) -> None: ...
    def recv_activation(self, stage: int, t: int, j: int) -> Tensor: ...
    def send_grad(self, stage: int, t: int, j: int, g: Tensor) -> None: ...
    def recv_grad(self, stage: int, t: int, j: int) -> Tensor: ...


class Batches(Protocol):
    """What the first and last stages read: micro-batch inputs and targets."""

    def input(self, t: int, j: int) -> Tensor: ...
    def target(self, t: int, j: int) -> Tensor: ...
    def fraction(self, t: int, j: int) -> float:
        """n_j / n: the weight of micro-batch j in mini-batch t's mean loss."""
        ...


class SplitBatches:
    """Mini-batches split into micro-batches with ``torch.tensor_split`` along dim 0.

    A micro-batch is cut when a stage asks for it, so an epoch is not held
    twice (the mini-batches and all their micro-batches).
    """

    def __init__(self, batches: Sequence[tuple[Tensor, Tensor]], num_microbatches: int) -> None:
        self._n = num_microbatches
        self._batches = batches

    # clones, not views: a micro-batch owns its rows, so its saved input counts its
    # own bytes rather than the whole mini-batch's storage
    def input(self, t: int, j: int) -> Tensor:
        return torch.tensor_split(self._batches[t][0], self._n)[j].clone()

    def target(self, t: int, j: int) -> Tensor:
        return torch.tensor_split(self._batches[t][1], self._n)[j].clone()

    def fraction(self, t: int, j: int) -> float:
        x = self._batches[t][0]
        return int(torch.tensor_split(x, self._n)[j].shape[0]) / int(x.shape[0])


def parameter_slots(
    module: nn.Module, params: Sequence[Tensor]
) -> list[list[tuple[nn.Module, str]]]:
    """For each of ``params``, every (submodule, name) that holds it (tied weights hold one twice)."""
    index = {id(p): i for i, p in enumerate(params)}
    slots: list[list[tuple[nn.Module, str]]] = [[] for _ in params]
    seen: set[tuple[int, str]] = set()
    for _, mod in module.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            i = index.get(id(p))
            if i is not None and (id(mod), name) not in seen:
                seen.add((id(mod), name))
                slots[i].append((mod, name))
    return slots


def microbatch_seed(seed: int, stage: int, t: int, j: int) -> int:
    """A seed per (stage, mini-batch, micro-batch): RNG use is independent of stage interleaving."""
    h = (seed * 1_000_003 + stage) * 1_000_033 + t
    return (h * 1_000_037 + j) % (2**63 - 1)


@dataclass
class _Saved:
    """What a forward leaves for its backward."""

    x: Tensor | None  # the stage input (a leaf requiring grad at stage > 0)
    out: Tensor | None  # the graph root: output, or the scaled loss at the last stage
    leaves: list[Tensor]  # forward weight leaves (graph rule)
    version: int  # forward version (absolute)
    activation_bytes: int
    backward_weights: list[Tensor] = field(default_factory=list)
    target: Tensor | None = None
    fraction: float = 1.0


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
        first: Tensor | None = next(iter(module.parameters()), None)
        if first is None:
            first = next(iter(module.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._grads: list[Tensor | None] = [None] * len(self.params)
        self._saved: dict[tuple[int, int], _Saved] = {}
        self._bw_cache: dict[int, tuple[list[Tensor], int, float]] = {}
        self.activation_bytes_live = 0
        self.peak_activation_bytes = 0
        self.activation_log: list[int] = []
        self._checked_input = False
        # per-schedule state, set by begin()
        self.plan: StagePlan | None = None
        self.base_version = 0  # updates applied before the current schedule
        self.base_minibatch = 0  # global index of the schedule's mini-batch 0
        self.losses: dict[int, float] = {}
        self.steps: dict[int, StageStep] = {}
        self.on_loss: Callable[[int, float], None] | None = None
        # (kind, mini-batch, micro-batches, seconds) of every action run while a
        # list is set here (the profiler's timing; device work is waited for)
        self.action_times: list[tuple[str, int, int, float]] | None = None
        # seconds spent inside the transport's receives, while action_times is set (the
        # share of the action times above that was waiting for a neighbour)
        self.recv_seconds = 0.0

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def begin(self, plan: StagePlan, base_minibatch: int) -> None:
        """Start a new schedule (the pipeline is drained: only the latest version is held)."""
        assert not self._saved, "a schedule started before the previous one drained"
        self.plan = plan
        self.base_version = self.store.latest
        self.base_minibatch = base_minibatch
        self.losses = {}
        self.steps = {}

    # -- the one entry point -------------------------------------------------
    def run(self, index: int, action: Action, transport: Transport, batches: Batches) -> None:
        """Execute action ``index`` of this stage's program."""
        assert self.plan is not None
        timing = self.action_times is not None
        if timing:
            sync_device(self.device)
            t0 = time.perf_counter()
        if action.kind == "F":
            assert action.microbatch is not None
            self._forward(action.minibatch, action.microbatch, transport, batches)
        elif action.kind == "B":
            # micro-batches of one action often share (forward, backward) versions:
            # build their backward weights and distance once
            self._bw_cache = {}
            for j in action.microbatches(self.num_microbatches):
                self._backward(action.minibatch, j, transport)
            self._bw_cache = {}
        else:
            self._update(index, action.minibatch)
        for v, last in self.plan.keep_until.items():
            if last == index:
                self.store.release(self.base_version + v)
        if timing:
            assert self.action_times is not None
            sync_device(self.device)
            count = len(action.microbatches(self.num_microbatches)) if action.kind == "B" else 1
            self.action_times.append(
                (
                    action.kind,
                    self.base_minibatch + action.minibatch,
                    count,
                    time.perf_counter() - t0,
                )
            )

    def _timed_recv(self, recv: Callable[[int, int, int], Tensor], t: int, j: int) -> Tensor:
        if self.action_times is None:
            return recv(self.index, t, j)
        t0 = time.perf_counter()
        out = recv(self.index, t, j)
        self.recv_seconds += time.perf_counter() - t0
        return out

    # -- forward ---------------------------------------------------------------
    def _rng(self, t: int, j: int) -> contextlib.AbstractContextManager[Any]:
        cuda = self.device.type == "cuda"
        seed = microbatch_seed(self.seed, self.index, self.base_minibatch + t, j)

        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            # only this stage's device generator is forked and seeded, so the
            # caller's random state is left as it was
            with torch.random.fork_rng(devices=[self.device] if cuda else []):
                torch.default_generator.manual_seed(seed)
                if cuda:
                    with torch.cuda.device(self.device):
                        torch.cuda.manual_seed(seed)
                yield

        return ctx()

    def _call(self, weights: list[Tensor], x: Tensor) -> Tensor:
        """The module on ``x`` with ``weights`` in place of its parameters (restored after)."""
        try:
            for slots, w in zip(self._slots, weights):
                for mod, name in slots:
                    mod._parameters[name] = w  # type: ignore[assignment]
            out: Tensor = self.module(x)
        finally:
            for slots, p in zip(self._slots, self.params):
                for mod, name in slots:
                    mod._parameters[name] = p
        return out

    def _forward(self, t: int, j: int, transport: Transport, batches: Batches) -> None:
        assert self.plan is not None
        if self.is_first:
            x = batches.input(t, j).to(self.device, non_blocking=True)
        else:
            x = self._timed_recv(transport.recv_activation, t, j).detach().requires_grad_()
        v = self.base_version + self.plan.forward_version[(t, j)]
        weights = self.store.get(v)
        target = batches.target(t, j).to(self.device, non_blocking=True) if self.is_last else None
        frac = batches.fraction(t, j) if self.is_last else 1.0
        if self.policy.grad_rule == "recompute":
            with torch.no_grad(), self._rng(t, j):
                out = self._checked_call(weights, x)
                if self.is_last:
                    loss = self._loss(out, target, t, j)
            saved = _Saved(x.detach(), None, [], v, tensor_bytes([x]), target=target, fraction=frac)
            if self.is_last:
                self._record_loss(t, j, loss, frac)
            else:
                transport.send_activation(self.index, t, j, out.detach())
        else:
            leaves = [w.detach().requires_grad_() for w in weights]
            saved = _Saved(x if not self.is_first else None, None, leaves, v, 0)
            with torch.autograd.graph.saved_tensors_hooks(*self._hooks(saved)), self._rng(t, j):
                out = self._checked_call(leaves, x)
                if self.is_last:
                    loss = self._loss(out, target, t, j)
                    out = loss * frac
            if self.is_last:
                self._record_loss(t, j, loss, frac)
            else:
                transport.send_activation(self.index, t, j, out.detach())
            saved.out = out
        self._saved[(t, j)] = saved
        self.activation_log.append(saved.activation_bytes)
        self.activation_bytes_live += saved.activation_bytes
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.activation_bytes_live)
        step = self.steps.setdefault(t, StageStep())
        step.forward_versions.append(v)

    def _checked_call(self, weights: list[Tensor], x: Tensor) -> Tensor:
        if self._checked_input:
            return self._call(weights, x)
        try:
            out = self._call(weights, x)
        except (RuntimeError, TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            what = "the input batch" if self.is_first else f"the output of stage {self.index - 1}"
            raise ShapeError(
                f"stage {self.index} cannot consume {what} "
                f"(shape {tuple(x.shape)}, dtype {x.dtype}): {first}"
            ) from exc
        if not isinstance(out, Tensor):
            raise ShapeError(
                f"stage {self.index} returned {type(out).__name__}; each stage must return one tensor"
            )
        self._checked_input = True
        return out

    def _loss(self, out: Tensor, target: Tensor | None, t: int, j: int) -> Tensor:
        assert self.loss_fn is not None and target is not None
        try:
            loss = self.loss_fn(out, target)
        except (RuntimeError, TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShapeError(
                f"loss_fn failed on the output of stage {self.index} (shape {tuple(out.shape)}) "
                f"and the target (shape {tuple(target.shape)}): {first}"
            ) from exc
        if loss.numel() != 1:
            raise ShapeError(
                f"loss_fn returned shape {tuple(loss.shape)}; it must return a scalar "
                "(use the default mean reduction)"
            )
        return loss

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

    def _hooks(self, saved: _Saved) -> tuple[Callable[[Tensor], Any], Callable[[Any], Tensor]]:
        """Pack weight reads as tokens; count the bytes of the other saved tensors."""
        storages = {
            w.untyped_storage().data_ptr(): i for i, w in enumerate(saved.leaves) if w.numel() > 0
        }
        # Buffers (BatchNorm running statistics) are updated in place by every
        # forward; autograd saves them although a training-mode backward does
        # not use their values. Keep a reference instead of a versioned copy,
        # or the next micro-batch's forward would trip autograd's version check.
        buffers = {
            b.untyped_storage().data_ptr(): b for b in self.module.buffers() if b.numel() > 0
        }
        counted: set[int] = set()

        def pack(t: Tensor) -> Any:
            ptr = t.untyped_storage().data_ptr() if t.numel() > 0 else 0
            i = storages.get(ptr)
            if i is not None and t.device == saved.leaves[i].device:
                leaf = saved.leaves[i]
                return ("w", i, t.size(), t.stride(), t.storage_offset() - leaf.storage_offset())
            if ptr in buffers:
                return ("b", buffers[ptr])
            if ptr not in counted and ptr != 0:
                counted.add(ptr)
                saved.activation_bytes += t.untyped_storage().nbytes()
            return t

        def unpack(p: Any) -> Tensor:
            if isinstance(p, tuple) and p[0] == "b":
                return p[1]
            if isinstance(p, tuple):
                _, i, size, stride, off = p
                w = saved.backward_weights[i]
                return w.as_strided(size, stride, w.storage_offset() + off)
            return p

        return pack, unpack

    # -- backward --------------------------------------------------------------
    def _backward(self, t: int, j: int, transport: Transport) -> None:
        assert self.plan is not None
        saved = self._saved.pop((t, j))
        v = saved.version
        k = self.store.latest
        assert k - self.base_version == self.plan.backward_version[(t, j)]
        cached = self._bw_cache.get(v)
        if cached is None:
            weights, transient = self._backward_weights(v, k)
            cached = (weights, transient, self._relative_distance(weights, k, v))
            self._bw_cache[v] = cached
        weights, transient, dist = cached
        self.store.observe(transient)
        grad_out = None if self.is_last else self._timed_recv(transport.recv_grad, t, j)
        want_dx = not self.is_first
        if self.policy.grad_rule == "recompute":
            grads, dx = self._recompute_grads(saved, weights, grad_out, t, j, want_dx)
        else:
            saved.backward_weights = weights
            inputs = list(saved.leaves) + ([saved.x] if want_dx and saved.x is not None else [])
            assert saved.out is not None
            res = torch.autograd.grad(saved.out, inputs, grad_outputs=grad_out, allow_unused=True)
            grads, dx = list(res[: len(saved.leaves)]), (res[-1] if want_dx else None)
        for i, g in enumerate(grads):
            if g is None:
                continue
            acc = self._grads[i]
            self._grads[i] = g if acc is None else acc.add_(g)
        if want_dx:
            if dx is None:
                assert saved.x is not None
                dx = torch.zeros_like(saved.x)
            transport.send_grad(self.index, t, j, dx)
        self.activation_bytes_live -= saved.activation_bytes
        step = self.steps.setdefault(t, StageStep())
        step.backward_version = k
        step.staleness.append(k - v)
        n_done = len(step.staleness)
        step.relative_distance += (dist - step.relative_distance) / n_done

    def _backward_weights(self, v: int, k: int) -> tuple[list[Tensor], int]:
        """The backward weights of a micro-batch with forward version v at version k."""
        reads = self.policy.backward_reads(v - self.base_version, k - self.base_version)
        if len(reads) == 1:
            return self.store.get(self.base_version + reads[0]), 0
        sigma = self.policy.significance(k - v)
        stale, latest = self.store.get(v), self.store.get(k)
        with torch.no_grad():
            mixed = [sigma * a + (1.0 - sigma) * b for a, b in zip(stale, latest)]
        return mixed, tensor_bytes(mixed)

    def _relative_distance(self, weights: list[Tensor], k: int, v: int) -> float:
        if v == k or not weights:
            return 0.0
        latest = self.store.get(k)
        if all(a is b or a.data_ptr() == b.data_ptr() for a, b in zip(weights, latest)):
            return 0.0
        # per-tensor norms in the weights' own dtype, summed in Python floats: a
        # report figure, so float64 copies of every weight are not worth their cost
        with torch.no_grad():
            num = sum(float(torch.linalg.vector_norm(a - b)) ** 2 for a, b in zip(weights, latest))
            den = sum(float(torch.linalg.vector_norm(b)) ** 2 for b in latest)
        return math.sqrt(num) / math.sqrt(den) if den > 0 else 0.0

    def _recompute_grads(
        self,
        saved: _Saved,
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
        with torch.enable_grad(), self._rng(t, j):
            out = self._call(leaves, x)
            if self.is_last:
                out = self._loss(out, saved.target, t, j) * saved.fraction
        inputs = leaves + ([x] if want_dx else [])
        res = torch.autograd.grad(out, inputs, grad_outputs=grad_out, allow_unused=True)
        with torch.no_grad():  # the replayed forward must not count twice in BatchNorm statistics
            for b, old in zip(self.module.buffers(), buffers):
                b.copy_(old)
        return list(res[: len(leaves)]), (res[-1] if want_dx else None)

    # -- update ----------------------------------------------------------------
    def _update(self, index: int, t: int) -> None:
        assert self.plan is not None
        if index in self.plan.stash_at:
            self.store.stash_latest()
        if self.optimizer is not None:
            if self.lr_lambda is not None:
                factor = self.lr_lambda(self.base_minibatch + t)
                for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                    group["lr"] = base * factor
            for p, g in zip(self.params, self._grads):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._grads = [None] * len(self.params)
        self.store.advance()
        self.store.observe()

    # -- figures -----------------------------------------------------------------
    def optimizer_state_bytes(self) -> int:
        return optimizer_state_bytes(self.optimizer)
