"""Choosing and building stages: balance modes, the partition's optimality, exactness, errors."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import Tensor, nn

import timeprest.splitting.partition as partition_mod
from splitting_models import Mixed, run_stages, seq_model
from timeprest.errors import ConfigError
from timeprest.splitting import (
    LayerTiming,
    SplitPlan,
    apply_plan,
    balanced_partition,
    plan_split,
    split,
)

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


def test_the_default_balance_is_params_and_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_timing(*args: object, **kwargs: object) -> list[LayerTiming]:
        raise AssertionError("the default balance must not time anything")

    monkeypatch.setattr(partition_mod, "profile_layers", no_timing)
    model = seq_model()
    plan = plan_split(model, 3)
    assert plan == plan_split(model, 3, "params") == plan_split(model, 3)
    assert plan.balance == "params" and plan.cost_unit == "params"
    assert [len(s) for s in split(model, 3)] == list(plan.layer_counts)


def test_to_dict_says_where_each_stages_layers_sit() -> None:
    model = seq_model()
    d = plan_split(model, 2, [5, 4]).to_dict()
    assert d["stages"] == [["0", "1", "2", "3", "4"], ["5", "6", "7", "8"]]
    assert d["layer_paths"] == d["stages"]  # a Sequential's children sit at their own names
    assert d["model_keys"] == list(model.state_dict())
    assert d["layer_counts"] == [5, 4] and d["balance"] == "counts"
    traced = plan_split(Mixed(), 2, [3, 3]).to_dict()
    assert traced["stages"] == [["conv", "relu", "inner__add"], ["size__view", "mul", "fc"]]
    assert traced["layer_paths"] == [["conv", "", ""], ["", "", "fc"]]


def test_time_balance_uses_measured_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_profile(
        layers: list[object], sample_input: Tensor, *, device: str, warmup: int, repeats: int
    ) -> list[LayerTiming]:
        seen["n"], seen["shape"], seen["device"] = len(layers), tuple(sample_input.shape), device
        costs = [1.0, 0.0, 5.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.5]
        return [LayerTiming(c / 4, c * 3 / 4) for c in costs]

    monkeypatch.setattr(partition_mod, "profile_layers", fake_profile)
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
