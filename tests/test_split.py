"""Stage split: layers from Sequential, fx tracing and the hook; balance modes; exactness."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from torch import Tensor, nn

import timeprest.splitting.partition as split_mod
from timeprest.errors import ConfigError
from timeprest.splitting import (
    LayerTiming,
    SplitPlan,
    apply_plan,
    balanced_partition,
    pipeline_layers,
    plan_split,
    split,
)


def run_stages(stages: list[nn.Module], x: Tensor) -> Tensor:
    for stage in stages:
        x = stage(x)
    return x


def seq_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 32),
        nn.Dropout(0.2),
        nn.ReLU(),
        nn.Linear(32, 5),
    )


class Chain(nn.Module):
    """Not a Sequential, but a plain chain: every call is a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x))
        x = self.fc2(x).tanh()
        return self.fc3(x)


class Mixed(nn.Module):
    """A residual add and ``view(size(0), -1)``: those calls must stay together."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.inner = nn.Conv2d(3, 3, 3, padding=1)
        self.scale = nn.Parameter(torch.full((1,), 2.0))
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x))
        x = x + self.inner(x)
        x = x.view(x.size(0), -1) * self.scale
        return self.fc(x)


class WholeResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(self.a(x))


class Branchy(nn.Module):
    """Control flow on tensor values: fx cannot trace it, the hook can split it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


class Hooked(Branchy):
    def forward(self, x: Tensor) -> Tensor:  # data dependence would defeat tracing
        return self.b(self.a(x)) if x.sum() > -1e9 else x

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.a, self.b]


# ---------------------------------------------------------------- layers


def test_sequential_layers_are_its_children() -> None:
    model = seq_model()
    layers = pipeline_layers(model)
    assert [name for name, _ in layers] == [str(i) for i in range(9)]
    assert all(a is b for (_, a), b in zip(layers, model))


def test_traced_chain() -> None:
    model = Chain()
    layers = pipeline_layers(model)
    assert [name for name, _ in layers] == ["fc1", "relu", "fc2", "tanh", "fc3"]
    assert layers[0][1] is model.fc1 and layers[4][1] is model.fc3
    x = torch.randn(5, 6)
    stages = split(model, 3, [2, 2, 1])
    assert torch.equal(run_stages(stages, x), model(x))


def test_traced_model_keeps_dependent_calls_together() -> None:
    model = Mixed()
    names = [name for name, _ in pipeline_layers(model)]
    assert names == ["conv", "relu", "inner__add", "size__view", "mul", "fc"]
    torch.manual_seed(1)
    x = torch.randn(3, 2, 8, 8)
    stages = split(model, 3, "params")
    assert torch.equal(run_stages(stages, x), model(x))
    # The parameter read by a function call comes along with its layer, shared, not copied.
    owners = [s for s in stages if any(p is model.scale for p in s.parameters())]
    assert len(owners) == 1


def test_untraceable_model_points_to_the_hook() -> None:
    with pytest.raises(
        ConfigError, match=r"cannot trace Branchy with torch.fx .*pipeline_layers\(self\)"
    ):
        split(Branchy(), 2, "params")


def test_one_segment_model_cannot_take_two_stages() -> None:
    assert len(pipeline_layers(WholeResidual())) == 1
    with pytest.raises(
        ConfigError,
        match=r"num_stages \(2\) exceeds the number of layers of WholeResidual \(1\).*pipeline_layers",
    ):
        split(WholeResidual(), 2, "params")


def test_hook() -> None:
    model = Hooked()
    stages = split(model, 2, "params")
    assert list(stages[0].children()) == [model.a] and list(stages[1].children()) == [model.b]
    x = torch.randn(2, 4)
    assert torch.equal(run_stages(stages, x), model(x))

    class Forgetful(Hooked):
        def pipeline_layers(self) -> list[nn.Module]:
            return [self.a]

    with pytest.raises(ConfigError, match=r"leaves out parameters b.weight, b.bias"):
        split(Forgetful(), 1, "params")

    class Wrong(Hooked):
        def pipeline_layers(self) -> list[nn.Module]:
            return [self.a, torch.relu]  # type: ignore[list-item]

    with pytest.raises(ConfigError, match="item 1 is builtin_function_or_method, not an nn.Module"):
        split(Wrong(), 1, "params")


# ---------------------------------------------------------------- exactness and sharing


@pytest.mark.parametrize("balance", ["params", "time", [2, 3, 3, 1]])
def test_stages_compose_to_the_model_exactly(balance: str | list[int]) -> None:
    model = seq_model()
    x = torch.randn(4, 1, 8, 8)
    stages = split(model, 4, balance, sample_input=x)  # type: ignore[arg-type]
    assert len(stages) == 4 and all(isinstance(s, nn.Sequential) for s in stages)
    # Train mode (batch statistics, dropout): same RNG, same numbers.
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    assert torch.equal(run_stages(stages, x), expected)
    model.eval()
    assert torch.equal(run_stages(stages, x), model(x))
    # Parameters are the model's own objects, each in exactly one stage.
    stage_params = [p for s in stages for p in s.parameters()]
    assert len(stage_params) == len(list(model.parameters()))
    assert {id(p) for p in stage_params} == {id(p) for p in model.parameters()}


def test_gradients_through_stages_match() -> None:
    model = Mixed()
    x = torch.randn(2, 2, 8, 8)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    model.zero_grad()
    run_stages(split(model, 4, "params"), x).square().sum().backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, expected[n]), n  # type: ignore[arg-type]


def test_tied_weights_across_stages_are_refused() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ConfigError, match="same tensor .*tied weights"):
        split(model, 2, [2, 1])
    assert len(split(model, 1, "params")) == 1  # one stage may hold both uses


# ---------------------------------------------------------------- balance modes


def test_params_balance_isolates_the_big_layer() -> None:
    model = nn.Sequential(
        nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 100), nn.Linear(100, 10), nn.ReLU()
    )
    plan = plan_split(model, 3, "params")
    assert (
        plan.layer_counts == (2, 1, 2) and plan.balance == "params" and plan.cost_unit == "params"
    )
    assert plan.stage_costs == (110.0, 1100.0, 1010.0)
    assert plan.stage_layers(1) == range(2, 3)


def test_time_balance_uses_measured_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_profile(
        layers: list[object], sample_input: Tensor, *, device: str, warmup: int, repeats: int
    ) -> list[LayerTiming]:
        seen["n"], seen["shape"], seen["device"] = len(layers), tuple(sample_input.shape), device
        costs = [1.0, 0.0, 5.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.5]
        return [LayerTiming(c / 4, c * 3 / 4) for c in costs]

    monkeypatch.setattr(split_mod, "profile_layers", fake_profile)
    x = torch.randn(4, 1, 8, 8)
    plan = plan_split(seq_model(), 3, "time", sample_input=x)
    assert seen == {"n": 9, "shape": (4, 1, 8, 8), "device": "cpu"}
    assert plan.layer_counts == (2, 1, 6) and plan.stage_costs == (1.0, 5.0, 5.5)
    assert plan.cost_unit == "s" and plan.balance == "time"
    assert plan.stage_timings() == (
        LayerTiming(0.25, 0.75),
        LayerTiming(1.25, 3.75),
        LayerTiming(1.375, 4.125),
    )


def test_real_profile_leaves_the_model_alone() -> None:
    model = seq_model()
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    stats = bn.running_mean.clone()
    x = torch.randn(8, 1, 8, 8)
    state = torch.get_rng_state()
    plan = plan_split(model, 3, "time", sample_input=x, warmup=1, repeats=2)
    assert sum(plan.layer_counts) == 9 and all(c > 0 for c in plan.layer_costs)
    assert all(t.forward > 0 and t.backward >= 0 for t in plan.layer_timings)
    assert plan.layer_timings[-1].backward > 0 and len(plan.stage_timings()) == 3
    assert max(plan.stage_costs) == pytest.approx(
        min(
            max(sum(plan.layer_costs[a:b]) for a, b in zip((0, i, j), (i, j, 9)))
            for i in range(1, 8)
            for j in range(i + 1, 9)
        )
    )
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(bn.running_mean, stats) and torch.equal(torch.get_rng_state(), state)
    json.dumps(plan.to_dict())


def test_counts_balance_costs() -> None:
    model = seq_model()
    plan = plan_split(model, 2, [5, 4])
    assert plan.balance == "counts" and plan.cost_unit == "params" and plan.stage_timings() == ()
    assert plan.stage_costs == (48.0, 4 * 4 * 4 * 32 + 32 + 32 * 5 + 5)
    assert next(apply_plan(model, plan)[1].children()) is model[5]
    timed = plan_split(model, 2, [5, 4], sample_input=torch.randn(2, 1, 8, 8), warmup=0, repeats=1)
    assert timed.cost_unit == "s" and timed.layer_counts == (5, 4)


def brute_force_min_max(costs: list[float], k: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_partition_is_optimal() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [float(rng.choice([0, 1, 2, 3, 5, 8, 13])) for _ in range(n)]
        counts = balanced_partition(costs, k)
        assert len(counts) == k and sum(counts) == n and min(counts) >= 1
        bounds = [0, *itertools.accumulate(counts)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert worst == brute_force_min_max(costs, k)
    # Ties on the maximum are broken toward even stages.
    assert balanced_partition([4.0, 1.0, 1.0, 1.0, 1.0], 3) == (1, 2, 2)


# ---------------------------------------------------------------- errors


def test_stage_count_errors() -> None:
    model = seq_model()
    with pytest.raises(
        ConfigError, match=r"num_stages \(10\) exceeds the number of layers of Sequential \(9\)"
    ):
        split(model, 10, "params")
    with pytest.raises(ConfigError, match="num_stages must be an integer >= 1, got 0"):
        split(model, 0, "params")


def test_balance_errors() -> None:
    model = seq_model()
    with pytest.raises(ConfigError, match="balance has 2 entries but num_stages is 3"):
        split(model, 3, [4, 5])
    with pytest.raises(ConfigError, match="balance sums to 8 but the model has 9 layers"):
        split(model, 2, [4, 4])
    with pytest.raises(ConfigError, match="at least one layer"):
        split(model, 2, [9, 0])
    with pytest.raises(ConfigError, match="balance='time' needs sample_input"):
        split(model, 2, "time")
    with pytest.raises(ConfigError, match="balance must be 'time', 'params' or a list"):
        split(model, 2, "flops")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="got 3"):
        split(model, 2, 3)  # type: ignore[arg-type]
    plan = SplitPlan((3,), (0.0,), "counts", ("a", "b", "c"), (0.0, 0.0, 0.0), "params")
    with pytest.raises(ConfigError, match="the plan covers 3 layers but the model has 9"):
        apply_plan(model, plan)
