"""How a stage's module runs on other weights than its live parameters.

Forward: the module's parameter slots (every submodule and name holding a
trained parameter, tied ones included) are found once; a forward writes the
forward version's leaf tensors into them and restores the Parameters after
(what ``torch.func.functional_call`` does, without its per-call lookup).

Backward on other weights (docs/design.md section 5, gradient rule
``graph``): while the forward runs, a ``saved_tensors_hooks`` pair replaces
every saved tensor that lives in one of the forward's weight tensors with a
token; at the backward the token unpacks to the same view of the *backward*
weights. So ``dW = delta^T x`` uses the saved activations and
``dx = delta W_b`` the backward weights, and autograd never holds the live
parameters that the optimizer updates in place. Buffers (BatchNorm running
statistics) are kept by reference, never versioned. Under autocast a saved
weight is often the weight's lower-precision cast (another storage): it is
recognised from its autograd node (a copy of the weight leaf) and unpacks to
the same cast of the backward weights (docs/design.md section 11). A forward
whose backward reads exactly what autograd would keep runs without the tokens
(the runner decides; docs/design.md section 5).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from timeprest.versions import BufferPool

Slots = list[list[tuple[nn.Module, str]]]
Grads = list[Tensor | None]  # a stage's accumulated gradients, None where none arrived


def parameter_slots(module: nn.Module, params: Sequence[Tensor]) -> Slots:
    """For each of ``params``, every (submodule, name) that holds it (tied weights hold one twice)."""
    index = {id(p): i for i, p in enumerate(params)}
    slots: Slots = [[] for _ in params]
    seen: set[tuple[int, str]] = set()
    for _, mod in module.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            i = index.get(id(p))
            if i is not None and (id(mod), name) not in seen:
                seen.add((id(mod), name))
                slots[i].append((mod, name))
    return slots


def buffer_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (submodule, name) holding a buffer, each once: ``module.buffers()`` without
    walking the module again (read them with ``submodule._buffers[name]``)."""
    slots: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    for _, mod in module.named_modules():
        for name, b in mod._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                slots.append((mod, name))
    return slots


def call_with(
    module: nn.Module, slots: Slots, params: Sequence[Tensor], weights: Sequence[Tensor], x: Tensor
) -> Tensor:
    """``module(x)`` with ``weights`` in place of ``params`` (the Parameters restored after)."""
    try:
        for where, w in zip(slots, weights):
            for mod, name in where:
                mod._parameters[name] = w  # type: ignore[assignment]
        out: Tensor = module(x)
    finally:
        for where, p in zip(slots, params):
            for mod, name in where:
                mod._parameters[name] = p  # type: ignore[assignment]
    return out


def microbatch_seed(seed: int, stage: int, t: int, j: int) -> int:
    """A seed per (stage, mini-batch, micro-batch): RNG use is independent of stage interleaving."""
    h = (seed * 1_000_003 + stage) * 1_000_033 + t
    return (h * 1_000_037 + j) % (2**63 - 1)


class _SeededCPU:
    """The CPU generator seeded inside, its state restored after (what ``fork_rng`` does for
    the CPU, without its per-call set-up: this runs at every forward)."""

    __slots__ = ("seed", "state")

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.default_generator.set_state(self.state)


def seeded(device: torch.device, seed: int) -> contextlib.AbstractContextManager[Any]:
    """Run with the device's generator seeded by ``seed``, the caller's random state kept."""
    if device.type != "cuda":
        return _SeededCPU(seed)

    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        # only this stage's device generator is forked and seeded (the CPU's too)
        with torch.random.fork_rng(devices=[device]):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
            yield

    return ctx()


@dataclass
class Saved:
    """What a forward leaves for its backward."""

    x: Tensor | None  # the stage input (a leaf requiring grad at stage > 0)
    out: Tensor | None  # the graph root: output, or the scaled loss at the last stage
    leaves: list[Tensor]  # forward weight leaves (graph rule)
    version: int  # forward version (absolute)
    activation_bytes: int
    backward_weights: list[Tensor] = field(default_factory=list)
    target: Tensor | None = None
    fraction: float = 1.0
    casts: dict[tuple[int, torch.dtype], Tensor] = field(default_factory=dict)
    """Backward weights cast for autocast, made once per (weight, dtype) at the backward."""
    fused: Any = None
    """The forward's fused nn.Linear layers (stage/fused.py), checked after the backward."""


def _cast_input(t: Tensor) -> Any:
    """The autograd node whose output ``t`` is a dtype cast of (autocast's), else None."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
        return None
    return fn.next_functions[0][0]


def weight_tokens(
    saved: Saved,
    module: nn.Module,
    reads: Sequence[Tensor] | None = None,
    *,
    buffers: Sequence[Tensor] | None = None,
) -> tuple[Callable[[Tensor], Any], Callable[[Any], Tensor]]:
    """The pack/unpack pair: weight reads become tokens; other saved bytes are counted.

    ``reads``: the tensors the forward runs on, when they are not the leaves
    themselves (a predicted forward computes them from the leaves). ``buffers``:
    ``module``'s buffers, when the caller has them at hand (walking the module for
    them costs more than the rest of this set-up at small sizes).
    """
    # ints only: the closures live as long as the graph and must not keep predicted weights
    storages = {
        w.untyped_storage().data_ptr(): (i, w.device, w.storage_offset())
        for i, w in enumerate(saved.leaves if reads is None else reads)
        if w.numel() > 0
    }
    # Buffers (BatchNorm running statistics) are updated in place by every
    # forward; autograd saves them although a training-mode backward does
    # not use their values. Keep a reference instead of a versioned copy,
    # or the next micro-batch's forward would trip autograd's version check.
    by_ptr = {
        b.untyped_storage().data_ptr(): b
        for b in (module.buffers() if buffers is None else buffers)
        if b.numel() > 0
    }
    leaf_index = {id(w): i for i, w in enumerate(saved.leaves)}
    # casts of predicted weights (computed from the leaves) are weight reads too
    node_index = {id(w.grad_fn): i for i, w in enumerate(reads or ()) if w.grad_fn is not None}
    counted: set[int] = set()
    # the closures live in the graph, which ``saved`` holds (its output): a strong
    # reference back would be a cycle through autograd's C++ side, which no collection
    # frees when the backward never runs (a failed run); the runner holds ``saved``
    # from the forward to the end of its backward, so the reference is alive whenever
    # a hook runs
    ref = weakref.ref(saved)
    del saved

    def pack(t: Tensor) -> Any:
        ptr = t.untyped_storage().data_ptr() if t.numel() > 0 else 0
        found = storages.get(ptr)
        if found is not None and t.device == found[1]:
            i, _, offset = found
            return ("w", i, t.size(), t.stride(), t.storage_offset() - offset)
        if ptr in by_ptr:
            return ("b", by_ptr[ptr])
        base = t if t._base is None else t._base
        node = _cast_input(base)
        if node is not None:
            variable = getattr(node, "variable", None)  # a leaf's
            k = leaf_index.get(id(variable)) if variable is not None else node_index.get(id(node))
            if k is not None:
                offset = t.storage_offset() - base.storage_offset()
                return ("c", k, base.dtype, t.size(), t.stride(), offset)
        if ptr not in counted and ptr != 0:
            counted.add(ptr)
            held = ref()
            assert held is not None, "internal: a forward's record went before its forward"
            held.activation_bytes += t.untyped_storage().nbytes()
        # detached: a saved output kept as itself holds its own grad_fn, the same kind of
        # cycle; autograd re-attaches the grad_fn when it unpacks
        return t.detach()

    def unpack(p: Any) -> Tensor:
        if not isinstance(p, tuple):
            return p
        if p[0] == "b":
            return p[1]
        held = ref()
        assert held is not None, "internal: a forward's record went before its backward"
        if p[0] == "c":
            _, i, dtype, size, stride, off = p
            cast = held.casts.get((i, dtype))
            if cast is None:
                cast = held.casts[(i, dtype)] = held.backward_weights[i].to(dtype)
            return cast.as_strided(size, stride, cast.storage_offset() + off)
        _, i, size, stride, off = p
        w = held.backward_weights[i]
        return w.as_strided(size, stride, w.storage_offset() + off)

    return pack, unpack


def blend(
    pool: BufferPool, stale: list[Tensor], latest: list[Tensor], sigma: float
) -> list[Tensor]:
    """The intermediate weight ``sigma * stale + (1 - sigma) * latest`` (docs/design.md
    section 5), as one ``lerp`` per tensor into pool tensors: one pass over the two
    versions instead of three, and still exactly ``latest`` at sigma = 0 and ``stale``
    at sigma = 1 (the two limits of section 5)."""
    out = [pool.take(b) for b in latest]
    with torch.no_grad():
        for o, a, b in zip(out, stale, latest):
            torch.lerp(b, a, sigma, out=o)
    return out


def relative_distance(weights: Sequence[Tensor], latest: Sequence[Tensor]) -> float:
    """``||weights - latest|| / ||latest||`` over all tensors together (docs/design.md 8)."""
    # per-tensor norms in the weights' own dtype, summed in Python floats: a
    # report figure, so float64 copies of every weight are not worth their cost
    with torch.no_grad():
        num = sum(float(torch.linalg.vector_norm(a - b)) ** 2 for a, b in zip(weights, latest))
        den = sum(float(torch.linalg.vector_norm(b)) ** 2 for b in latest)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else 0.0
