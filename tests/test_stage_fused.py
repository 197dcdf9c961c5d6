"""Fused accumulation (stage/fused.py): bitwise autograd's training, and where it stays off."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

import timeprest
from timeprest.errors import ConfigError
from timeprest.policy.methods import METHODS
from timeprest.stage import fused as fused_module

W = 512  # 512 x 512 = 2^18 elements: the smallest weight that is fused
ROWS = (7, 7, 7, 3)  # uneven micro-batches: several kinds of sum per layer


def plain(num: int = 2) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(W, W), nn.ReLU(), nn.Linear(W, W)) for _ in range(num)]


def pipeline(
    stages: Sequence[nn.Module | None], method: str = "gpipe", num_microbatches: int = 2, **kw: Any
) -> timeprest.Pipeline:
    """A pipeline over copies of ``stages`` (SGD with momentum, MSE loss)."""
    return timeprest.Pipeline(
        copy.deepcopy(stages),
        method=method,
        num_microbatches=num_microbatches,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        loss_fn=nn.functional.mse_loss,
        **kw,
    )


def data(minibatches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same mini-batches of sum(ROWS) rows at every call."""
    g = torch.Generator().manual_seed(1)
    rows = sum(ROWS)
    return [
        (torch.randn(rows, W, generator=g), torch.randn(rows, W, generator=g))
        for _ in range(minibatches)
    ]


def train(
    method: str, fused: bool, stages: list[nn.Module], minibatches: int = 4
) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    pipe = pipeline(stages, method, len(ROWS), fused_accumulation=fused)
    losses = pipe.train(data(minibatches))
    states = []
    for m in pipe.stages:
        assert m is not None
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    return losses, states


@pytest.fixture
def fused_sums(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records every gradient the fused path adds (True: into an accumulator)."""
    calls: list[bool] = []
    add = fused_module.add_into

    def recorded(leaf: torch.Tensor, *args: Any) -> None:
        calls.append(leaf.grad is not None)
        add(leaf, *args)

    monkeypatch.setattr(fused_module, "add_into", recorded)
    return calls


def assert_same(a: Any, b: Any) -> None:
    assert a[0] == b[0]
    for sa, sb in zip(a[1], b[1], strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_accumulation_trains_bitwise_as_autograd(method: str, fused_sums: list[bool]):
    stages = plain()
    fused = train(method, True, stages)
    assert any(fused_sums), "no gradient was added in the product"
    # and only ever into an accumulator: the micro-batch backpropagated first in a
    # mini-batch (GPipe's last) writes fresh gradients, and hooking it would gain nothing
    assert all(fused_sums), "a mini-batch's first backward was fused"
    fused_sums.clear()
    assert_same(fused, train(method, False, stages))
    assert not fused_sums  # off means off


class Twice(nn.Module):
    """One layer called twice per forward: its two gradients are summed, then added."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class Outside(nn.Module):
    """A layer whose weight the forward also reads directly: never fused."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 0.5 * x @ self.lin.weight.t()


def test_a_layer_called_twice_sums_its_gradients_first(fused_sums: list[bool]) -> None:
    torch.manual_seed(0)
    stages: list[nn.Module] = [Twice(), Twice()]
    for method in ("gpipe", "v-timeprest"):
        fused = train(method, True, stages)
        assert fused_sums
        fused_sums.clear()
        assert_same(fused, train(method, False, stages))


def test_a_weight_read_outside_its_layer_stays_autograds(fused_sums: list[bool]) -> None:
    torch.manual_seed(0)
    stages: list[nn.Module] = [Outside(), nn.Sequential(nn.Linear(W, W))]
    fused = train("v-timeprest", True, stages)
    assert_same(fused, train("v-timeprest", False, stages))
    # both can be fused until the first forward has counted the uses: then stage 0's goes
    pipe = pipeline(stages)
    assert [bool(r.fused) for r in pipe.runners] == [True, True]
    pipe.train([(torch.randn(4, W), torch.randn(4, W))] * 2)
    assert [bool(r.fused) for r in pipe.runners] == [False, True]


def test_a_later_use_outside_the_layer_is_an_error() -> None:
    class Sometimes(Outside):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Sometimes.calls += 1  # the second forward (mini-batch 0, micro-batch 1) counts
            return self.lin(x) if Sometimes.calls <= 2 else super().forward(x)

    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="fused_accumulation=False"):
        train("gpipe", True, [Sometimes(), nn.Sequential(nn.Linear(W, W))])


def test_small_weights_and_other_layers_are_not_fused() -> None:
    torch.manual_seed(0)
    small = [nn.Sequential(nn.Linear(64, 64)), nn.Sequential(nn.Linear(64, 64))]
    pipe = pipeline(small)
    assert not any(r.fused for r in pipe.runners)

    class MyLinear(nn.Linear):
        pass

    wide = [nn.Sequential(MyLinear(W, W)), nn.Sequential(nn.Linear(W, W))]
    pipe = pipeline(wide)
    assert [bool(r.fused) for r in pipe.runners] == [False, True]
    with pytest.raises(ConfigError, match="fused_accumulation must be True or False"):
        pipeline(wide, fused_accumulation=1)


def test_a_kind_whose_sums_differ_is_summed_as_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where addmm_ rounds differently, the probe finds it and the kind stays unfused."""
    leaf = torch.zeros(4, 3, requires_grad=True)
    leaf.grad = torch.randn(4, 3)
    gy, x = torch.randn(5, 4), torch.randn(5, 3)
    monkeypatch.setattr(fused_module, "_AGREES", {})

    def off_by_one(self: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.add_(a.mm(b)).add_(1e-3)  # a BLAS that rounds otherwise

    want = leaf.grad + gy.t().mm(x)
    monkeypatch.setattr(torch.Tensor, "addmm_", off_by_one)
    fused_module.add_into(leaf, None, gy, x)
    assert torch.equal(leaf.grad, want)
    assert list(fused_module._AGREES.values()) == [False]
    fused_module.add_into(leaf, None, gy, x)  # now autograd's product and add
    assert torch.equal(leaf.grad, want + gy.t().mm(x))


def _runtime_worker(rank: int, world: int, tmp: str) -> None:
    from helpers import init_group
    from timeprest.engine.runtime import RuntimeOptions

    init_group(rank, world, f"{tmp}/rdv")
    out = {}
    for method in ("v-timeprest", "i-timeprest"):
        pipe = pipeline(
            [m if s == rank else None for s, m in enumerate(plain(world))],
            method,
            len(ROWS),
            engine="distributed",
            runtime=RuntimeOptions(timeout=60),
        )
        losses = pipe.train(data())
        module = pipe.stages[rank]
        assert module is not None
        out[method] = (losses, {k: v.clone() for k, v in module.state_dict().items()})
    torch.save(out, f"{tmp}/rank{rank}.pt")


def test_the_runtime_fuses_as_the_emulator(tmp_path: Any) -> None:
    from helpers import spawn

    assert spawn(_runtime_worker, 2, tmp_path, limit=120) == [0, 0]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for method in ("v-timeprest", "i-timeprest"):
        pipe = pipeline(plain(2), method, len(ROWS))
        want = pipe.train(data())
        assert got[1][method][0] == want, method  # the last rank reports the losses
        for r in range(2):
            module = pipe.stages[r]
            assert module is not None
            for k, v in module.state_dict().items():
                assert torch.equal(got[r][method][1][k], v), (method, r, k)


class Hooked(nn.Module):
    """A hook on a layer's output scales the gradient the layer's weight sees."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.requires_grad:
            y.register_hook(lambda g: g * 0.5)
        return self.b(torch.relu(y))


class Checkpointed(nn.Module):
    """Activation checkpointing inside the stage: the replay must save what the forward did."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        inner = checkpoint(lambda z: torch.relu(self.a(z)), x, use_reentrant=False)
        return self.b(inner)


class Skipping(nn.Module):
    """A layer whose output reaches the loss in some forwards only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.a(x)
        return self.b(y if self.calls % 3 else y.detach() * 0 + x)


@pytest.mark.parametrize("kind", [Hooked, Checkpointed, Skipping])
def test_hooks_checkpoints_and_unused_outputs_train_as_autograd(kind: type) -> None:
    torch.manual_seed(0)
    stages: list[nn.Module] = [kind(), kind()]
    for method in ("gpipe", "v-timeprest"):
        assert_same(train(method, True, stages), train(method, False, stages))


def test_saved_activation_bytes_count_the_input_the_hook_keeps() -> None:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(W, W), nn.BatchNorm1d(W), nn.Linear(W, W)) for _ in range(2)]
    peaks = []
    for fused in (True, False):
        pipe = pipeline(stages, fused_accumulation=fused)
        pipe.train([(torch.randn(8, W), torch.randn(8, W))] * 3)
        peaks.append([s.peak_activation_bytes for s in pipe.report.stages])
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize("kind", [None, Skipping])
def test_nothing_of_a_fused_forward_outlives_its_backward(
    kind: type | None, fused_sums: list[bool]
) -> None:
    """A hook on a product's node holds its forward's record, which can hold the forward's
    saved tensors and so its graph: left on, that cycle through autograd's C++ side kept
    every forward alive (the process grew by its activations at every mini-batch)."""
    import gc

    torch.manual_seed(0)
    stages = plain() if kind is None else [kind(), kind()]
    for method in ("gpipe", "pipedream", "v-timeprest", "i-timeprest"):
        pipe = pipeline(stages, method, len(ROWS))
        pipe.train(data(3))
        pipe.train(data(3))
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, fused_module._Forward)]
        assert not alive, method
    assert any(fused_sums)


def test_no_forward_waits_for_the_cycle_collector(fused_sums: list[bool]) -> None:
    """With Python's collector off, a drained pipeline keeps no forward's record or saved
    tensors: a fused record holds the stage's saved-tensor hooks, whose closures held the
    forward's ``Saved`` (now weakly), which holds the record; only a full collection (rare
    with torch loaded) freed that cycle, and with it the forward's weight version and
    graph."""
    import gc

    kinds = (fused_module._Forward, timeprest.stage.weights.Saved)

    def records() -> set[int]:
        return {id(o) for o in gc.get_objects() if type(o) in kinds}

    stages = plain()
    was_enabled = gc.isenabled()
    gc.collect()
    before = records()  # another test's pipeline may still be referenced
    gc.disable()
    try:
        for method in ("i-timeprest", "pipedream-2bw", "timeprest", "pipemare"):
            fused_sums.clear()
            pipe = pipeline(stages, method, len(ROWS))
            pipe.train(data(3))
            assert any(fused_sums), method  # the fused path ran
            assert not records() - before, method
            del pipe
    finally:
        if was_enabled:
            gc.enable()
