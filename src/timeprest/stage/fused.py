"""Weight gradients of ``nn.Linear`` layers added into their accumulators in the product.

With N > 1 micro-batches every backward after a mini-batch's first adds its
weight gradients to the ones already there. Autograd does that as a matrix
product into a new tensor and an ``add_``: for a wide layer and a narrow
micro-batch the product writes as many bytes as the weight, and the sum reads
them back with the accumulator (3 x 2048^2 at 16 rows: 2.4 ms a layer against
1.2 ms for the product alone, one thread). ``acc.addmm_(grad_out.t(), x)``
does both in the product's time, and for the shapes that matter it rounds
the same: the product of a 2-D ``F.linear`` backward is exactly
``grad_out.t().mm(x)``, and a BLAS that sums over all rows in one block and
adds the accumulator last gives bitwise the sum autograd gives.

So a forward here runs such a layer on its weight *detached* (autograd then
computes the input's and the bias's gradients as always, but not the
weight's) and hooks the product's node: the hook, which sees the output's
gradient after any hook on the output itself, adds the weight's gradient
into ``leaf.grad``, the accumulator the stage's backward put there. The input
it needs is kept through the stage's saved-tensor hooks, as autograd would
have saved it (so its bytes are counted); a layer run inside other
saved-tensor hooks (activation checkpointing, whose replay must save what the
forward saved) stays autograd's, and a call whose output does not reach the
stage's output adds nothing. The hooks come off after the backward
(:meth:`_Forward.unhook`): left on, they would keep the forward alive.
Where the two ways agree is not assumed: the first sum of each kind (shapes,
strides, alignment, dtype, threads) is done both ways and compared bitwise;
only a kind that agreed is fused after (BLAS order does not depend on the
values). The first gradient of a mini-batch is ``grad_out.t().mm(x)`` itself,
what autograd stores.

Only where nothing else could see the difference: a plain ``nn.Linear``
(not a subclass) holding the weight in the one place the stage has it, a
2-D float32 input on the CPU outside autocast, a weight of at least
:data:`MIN_NUMEL` elements, a backward that adds into the accumulators
(``StageRunner._backward_into_accumulators``). A weight used more than once
in a forward has its gradients summed first, in the order they arrive, as
autograd's input buffer sums them. The stage's first such forward runs as
autograd would and counts, in its graph, the uses of each weight: one that
the forward also uses some other way than through its ``nn.Linear`` (read
from the module by other code) is never fused. A later forward that starts
doing so is an error naming the option that turns the fusion off
(``Pipeline(fused_accumulation=False)``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timeprest.errors import ConfigError

MIN_NUMEL = 1 << 18  # smaller weights gain less than the hook costs

# (grad_out, x, accumulator) kinds -> whether addmm_ gave the sum autograd gives
_AGREES: dict[tuple[Any, ...], bool] = {}


def _kind(gy: Tensor, x: Tensor, acc: Tensor) -> tuple[Any, ...]:
    return (
        gy.shape, x.shape, acc.shape, gy.stride(), x.stride(), acc.stride(),
        gy.data_ptr() % 64, x.data_ptr() % 64, acc.data_ptr() % 64,
        gy.dtype, torch.get_num_threads(),
    )  # fmt: skip


def add_into(leaf: Tensor, g: Tensor | None, gy: Tensor, x: Tensor) -> None:
    """Add ``g`` (a summed weight gradient) or, with ``g`` None, ``gy.t() @ x`` into
    ``leaf.grad`` as autograd's accumulation would (a first one becomes it)."""
    acc = leaf.grad
    if g is not None:
        if acc is None:
            leaf.grad = g
        else:
            acc.add_(g)
        return
    if acc is None:
        leaf.grad = gy.t().mm(x)
        return
    kind = _kind(gy, x, acc)
    agrees = _AGREES.get(kind)
    if agrees:
        acc.addmm_(gy.t(), x)
        return
    if agrees is None:
        fused = acc.clone().addmm_(gy.t(), x)
        acc.add_(gy.t().mm(x))
        _AGREES[kind] = torch.equal(fused, acc)
        return
    acc.add_(gy.t().mm(x))


def _same_hooks(a: Any, b: Any) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a[0] is b[0])


def _edges_into_leaves(
    out: Tensor, leaves: dict[int, int], seen: dict[int, Any] | None = None
) -> dict[int, int]:
    """Per leaf index (``leaves``: id -> index), the graph edges from ``out`` into it;
    ``seen`` collects the nodes reached, by id. It holds them: a node's Python object
    lives only while referenced, and a new one could take a freed one's id."""
    edges: dict[int, int] = {}
    seen = {} if seen is None else seen
    todo = [out.grad_fn] if out.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        for child, _ in node.next_functions:
            if child is None:
                continue
            i = leaves.get(id(getattr(child, "variable", None)))
            if i is not None:
                edges[i] = edges.get(i, 0) + 1
            todo.append(child)
    return edges


class _Forward:
    """One forward's fused layers: their hooks, uses and what the backward must find."""

    def __init__(self, leaves: Sequence[Tensor], counting: bool) -> None:
        self.leaves = leaves
        self.counting = counting  # autograd's way, the uses counted (the first forward)
        self.uses: dict[int, int] = {}  # leaf index -> fused calls whose output counts
        self.nodes: list[tuple[int, Any]] = []  # (leaf index, the product's node) per call
        self.pending: dict[int, Tensor] = {}  # leaf index -> gradients summed so far
        self.seen: dict[int, int] = {}  # leaf index -> hooks fired
        # id of a product's node -> its hook's handle, while the hook can still run
        self.handles: dict[int, Any] = {}
        # the saved-tensor hooks around the stage's forward (the runner's tokens, or none):
        # inside other ones (activation checkpointing) a layer stays autograd's, so that
        # what a replay saves matches; ours pack the input the hook keeps, as autograd
        # would have saved it (its bytes counted)
        self.hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def linear(self, i: int, mod: nn.Linear, x: Tensor) -> Tensor:
        w, b = mod.weight, mod.bias
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or (b is not None and b.requires_grad)
        )
        if (
            x.dim() != 2
            or not wants_grad
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
            or not _same_hooks(
                torch._C._autograd._top_saved_tensors_default_hooks(False), self.hooks
            )
        ):
            return F.linear(x, w, b)
        self.uses[i] = self.uses.get(i, 0) + 1
        if self.counting:
            return F.linear(x, w, b)
        y = F.linear(x, w.detach(), b)
        kept = x.detach() if self.hooks is None else self.hooks[0](x.detach())
        # on the product's node, not the tensor: the gradient after any hook on the output
        node = y.grad_fn
        assert node is not None  # the input or the bias wants a gradient
        handle = node.register_prehook(functools.partial(self._hook, i, kept))
        self.nodes.append((i, node))
        self.handles[id(node)] = handle
        return y

    def _hook(self, i: int, kept: Any, grad_outputs: tuple[Tensor, ...]) -> None:
        x = kept if self.hooks is None else self.hooks[1](kept)
        gy = grad_outputs[0]
        self.seen[i] = self.seen.get(i, 0) + 1
        leaf = self.leaves[i]
        if self.uses[i] == 1:
            add_into(leaf, None, gy, x)
            return
        g = gy.t().mm(x)  # several uses: summed as they arrive, then accumulated once
        total = self.pending.get(i)
        total = g if total is None else total + g
        if self.seen[i] < self.uses[i]:
            self.pending[i] = total
        else:
            self.pending.pop(i, None)
            add_into(leaf, total, gy, x)

    def check_graph(self, out: Tensor) -> None:
        """A fused weight must reach autograd through its hooks alone; a call whose output
        does not reach ``out`` adds nothing (its hook never runs)."""
        reached: dict[int, Any] = {}
        fused = {id(self.leaves[i]): i for i, _ in self.nodes}
        edges = _edges_into_leaves(out, fused, reached)
        self.uses = {}
        for i, node in self.nodes:
            if id(node) in reached:
                self.uses[i] = self.uses.get(i, 0) + 1
            else:  # its hook never runs
                self.handles.pop(id(node)).remove()
        self.nodes = []  # a node holds its hook, the hook this record: no cycle left behind
        if edges:
            raise ConfigError(
                "a weight of an nn.Linear is used outside that layer in this stage's "
                "forward, which its first forward did not do; turn fused accumulation off "
                "(Pipeline(fused_accumulation=False))"
            )

    def unhook(self) -> None:
        """Take the hooks off the products' nodes (after the backward, or a failed
        forward). A hook holds this record, and through the stage's saved-tensor hooks
        the record can hold the forward's ``Saved`` and so its output and graph: a cycle
        through autograd's C++ side that Python's collector cannot see, which kept every
        such forward's tensors alive for good."""
        for handle in self.handles.values():
            handle.remove()
        self.handles = {}

    def check_backward(self) -> None:
        if self.seen != self.uses or self.pending:
            raise AssertionError(
                f"internal: fused weight gradients incomplete (hooks {self.seen}, uses {self.uses})"
            )


class FusedLinears:
    """The stage's ``nn.Linear`` weights that can be fused, found once from its slots."""

    def __init__(self, slots: Sequence[Sequence[tuple[nn.Module, str]]]) -> None:
        self.where: list[tuple[int, nn.Linear]] = []
        self.counted = False  # the first forward counts the uses (then some may go)
        for i, places in enumerate(slots):
            if len(places) != 1:
                continue  # shared between modules: autograd's own sum
            mod, name = places[0]
            weight = getattr(mod, name, None)
            if (
                type(mod) is nn.Linear
                and name == "weight"
                and isinstance(weight, Tensor)
                and weight.numel() >= MIN_NUMEL
                and weight.device.type == "cpu"
                and "forward" not in vars(mod)
            ):
                self.where.append((i, mod))

    def __bool__(self) -> bool:
        return bool(self.where)

    def disable(self) -> None:
        """Fuse nothing (``Pipeline(fused_accumulation=False)``)."""
        self.where = []

    @contextlib.contextmanager
    def forward(self, leaves: Sequence[Tensor]) -> Iterator[_Forward]:
        """The layers run fused while the block runs (the module's own forward after);
        the first time, as autograd would, their uses counted."""
        record = _Forward(leaves, counting=not self.counted)
        try:
            for i, mod in self.where:
                mod.forward = functools.partial(record.linear, i, mod)  # type: ignore[method-assign]
            yield record
        except BaseException:
            record.unhook()  # a failed forward never reaches after() nor a backward
            raise
        finally:
            for _, mod in self.where:
                vars(mod).pop("forward", None)

    def after(self, record: _Forward, out: Tensor) -> _Forward | None:
        """After a forward: the record its backward checks (None: nothing was fused).

        The counting forward keeps the weights whose every use in the graph is a call
        of their layer (another use: autograd sums them all, so they stay autograd's)."""
        if not record.counting:
            record.check_graph(out)
            return record if record.handles else None
        edges = _edges_into_leaves(out, {id(w): i for i, w in enumerate(record.leaves)})
        self.where = [(i, m) for i, m in self.where if edges.get(i, 0) == record.uses.get(i)]
        self.counted = True
        return None
