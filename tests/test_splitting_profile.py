"""Timing layers, and the sample input derived when the caller gives none."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from splitting_models import seq_model
from timeprest.errors import ConfigError
from timeprest.splitting import pipeline_layers, plan_split, sample_input_for


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


def test_a_linear_first_layer_gives_the_sample() -> None:
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh()).double()
    x = sample_input_for(pipeline_layers(model))
    assert x.shape == (32, 6) and x.dtype == torch.float64
    assert torch.equal(x, sample_input_for(pipeline_layers(model)))  # the same every time
    nested = nn.Sequential(nn.Sequential(nn.Linear(5, 2), nn.ReLU()), nn.Linear(2, 1))
    assert sample_input_for(pipeline_layers(nested)).shape == (32, 5)


def test_time_without_a_sample_times_the_derived_one() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 4))
    state = torch.get_rng_state()
    plan = plan_split(model, 2, "time", warmup=0, repeats=1)
    assert plan.balance == "time" and plan.cost_unit == "s" and len(plan.layer_timings) == 4
    assert torch.equal(torch.get_rng_state(), state)


def test_other_first_layers_ask_for_a_sample() -> None:
    with pytest.raises(ConfigError, match=r"needs sample_input .*the first layer, Conv2d, does"):
        plan_split(seq_model(), 2, "time")
    flat_first = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="the first layer, Flatten, does not fix the input shape"):
        sample_input_for(pipeline_layers(flat_first))
