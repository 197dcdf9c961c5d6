"""sim/profile.py: measured cost models, and the simulator's memory predictions from them
checked against what the emulator measures on the same stages."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import alive_tensors
from timeprest import Pipeline
from timeprest.errors import ConfigError
from timeprest.policy import METHODS, resolve
from timeprest.sim import CostModel, SimResult, simulate


def tiny_stages(w: int, seed: int = 0) -> list[nn.Module]:
    """An MLP 8 -> 32 -> ... -> 4 in ``w`` stages of one Linear (+ ReLU) each, float32."""
    torch.manual_seed(seed)
    widths = [8] + [32] * (w - 1) + [4]
    stages: list[nn.Module] = []
    for s in range(w):
        layer = nn.Linear(widths[s], widths[s + 1])
        stages.append(nn.Sequential(layer, nn.ReLU()) if s < w - 1 else nn.Sequential(layer))
    return stages


def test_profile_stages_sizes_and_leaves_the_model_alone():
    from timeprest.sim.profile import profile_stages

    stages = tiny_stages(3)
    before = [p.detach().clone() for m in stages for p in m.parameters()]
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    cm = profile_stages(stages, x, 4, sample_target=y, loss_fn=F.mse_loss, warmup=0, repeats=1)
    assert cm.num_stages == 3 and cm.input_bytes == 4 * 8 * 4
    assert [c.weight_bytes for c in cm.stages] == [
        (8 * 32 + 32) * 4,
        (32 * 32 + 32) * 4,
        (32 * 4 + 4) * 4,
    ]
    assert [c.output_bytes for c in cm.stages] == [4 * 32 * 4, 4 * 32 * 4, 0]
    # SGD with momentum keeps one buffer per parameter
    assert [c.optimizer_state_bytes for c in cm.stages] == [c.weight_bytes for c in cm.stages]
    # Linear saves its input, ReLU its output (4 rows of float32); the last stage's
    # mse_loss saves its two operands
    assert cm.stages[0].saved_activation_bytes == 4 * 8 * 4 + 4 * 32 * 4
    assert cm.stages[1].saved_activation_bytes == 4 * 32 * 4 + 4 * 32 * 4
    assert cm.stages[2].saved_activation_bytes == 4 * 32 * 4 + 2 * 4 * 4 * 4
    assert all(c.forward_time > 0 and c.backward_time > 0 for c in cm.stages)
    after = [p.detach() for m in stages for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for m in stages for p in m.parameters())


def test_profiling_keeps_nothing_of_its_copies():
    """The sizing forward is never backpropagated: its counting hooks save each tensor
    detached, or a saved output would hold its own graph in a cycle through autograd's
    C++ side, which no collection frees (every profile kept a copy of the model)."""
    from timeprest.sim.profile import profile_stages

    stages = tiny_stages(3)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    before = alive_tensors((32, 32))
    for method in (None, "i-timeprest"):
        profile_stages(
            stages, x, 4, sample_target=y, loss_fn=F.mse_loss, warmup=0, repeats=1, method=method
        )
        assert alive_tensors((32, 32)) == before, method


def test_profile_times_the_engine_path_or_the_layers_alone():
    from timeprest.sim.profile import profile_stages

    x, y = torch.randn(16, 8), torch.randn(16, 4)
    kw: dict = dict(sample_target=y, loss_fn=F.mse_loss, warmup=1, repeats=2)
    engine = profile_stages(tiny_stages(3), x, 4, method="gpipe", **kw)
    plain = profile_stages(tiny_stages(3), x, 4, method=None, **kw)
    assert engine.meta["timed"] == "engine, method gpipe"
    assert plain.meta["timed"] == "layers alone"
    for e, p in zip(engine.stages, plain.stages):
        assert e.forward_time > 0 and e.backward_time > 0 and e.update_time > 0
        assert p.forward_time > 0 and p.backward_time > 0 and p.update_time > 0
        # the sizes do not depend on how the times were taken
        assert (e.weight_bytes, e.output_bytes, e.saved_activation_bytes) == (
            p.weight_bytes,
            p.output_bytes,
            p.saved_activation_bytes,
        )
        assert e.optimizer_state_bytes == p.optimizer_state_bytes
    with pytest.raises(ConfigError, match="unknown method"):
        profile_stages(tiny_stages(2), x, 2, method="nope", **kw)


@pytest.mark.parametrize("method", ["gpipe", "v-timeprest", "pipedream-2bw"])
def test_stage_runner_times_every_action_once(method: str):
    n, t = 4, 3
    pipe = Pipeline(
        tiny_stages(3),
        method=method,
        num_microbatches=n,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        loss_fn=F.mse_loss,
    )
    for r in pipe.runners:
        r.action_times = []
    pipe.train([(torch.randn(16, 8), torch.randn(16, 4))] * t)
    for r in pipe.runners:
        assert r.action_times is not None
        kinds = [k for k, *_ in r.action_times]
        assert kinds.count("F") == n * t and kinds.count("U") == t
        # a B action over the whole mini-batch counts its N micro-batches
        assert sum(c for k, _, c, _, _ in r.action_times if k == "B") == n * t
        assert sorted({mb for _, mb, *_ in r.action_times}) == list(range(t))
        assert all(sec > 0 and waited == 0.0 for _, _, _, sec, waited in r.action_times)


def test_time_actions_trains_and_times_every_stage():
    """Pipeline.time_actions: a real train() call (the updates and the count move on),
    each stage's costs, the fill skipped counting from the call's first mini-batch."""
    pipe = Pipeline(
        tiny_stages(3),
        method="v-timeprest",
        num_microbatches=2,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        loss_fn=F.mse_loss,
    )
    batches = [(torch.randn(8, 8), torch.randn(8, 4))] * 5
    pipe.train(batches)
    costs = pipe.time_actions(batches)  # skips 3 of 5: numbered 5 to 9, from 8 on
    assert pipe.minibatches_done == 10 and [pipe.version(s) for s in range(3)] == [10] * 3
    assert len(costs) == 3 and all(f > 0 and b > 0 and u > 0 for f, b, u in costs)
    assert all(r.action_times is None for r in pipe.runners)
    # the default skip is the fill, W = 3 mini-batches; refused before any training
    with pytest.raises(ConfigError, match="got 3 mini-batches and skips the first 3"):
        pipe.time_actions(batches[:3])
    assert pipe.minibatches_done == 10
    # an iterator's count is known only after it: trained, then refused, timing off
    with pytest.raises(ConfigError, match="got 2 mini-batches and skips the first 2"):
        pipe.time_actions(iter(batches[:2]), skip=2)
    assert pipe.minibatches_done == 12
    assert all(r.action_times is None for r in pipe.runners)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="skip must be an integer >= 0"):
            pipe.time_actions(batches, skip=bad)  # type: ignore[arg-type]


def test_action_costs_leave_the_waiting_out():
    """Per mini-batch the mean of its actions less their waiting (a B per micro-batch),
    then the median over mini-batches; mini-batches below ``skip`` left out."""
    from timeprest.stage.timing import action_costs

    times = [
        ("F", 0, 1, 9.0, 0.0),  # a slow fill: skipped below
        ("B", 0, 1, 9.0, 0.0),
        ("U", 0, 1, 9.0, 0.0),
    ]
    for t, stall in ((1, 0.0), (2, 5.0), (3, 0.0)):
        times += [
            ("F", t, 1, 1.0 + stall, stall),  # waited for its input: counted as 1.0
            ("F", t, 1, 3.0, 0.0),
            ("B", t, 2, 4.0 + 0.5 * t, 0.5 * t),  # two micro-batches, 2.0 each
            ("U", t, 1, 0.5 + t, 0.0),  # 1.5, 2.5, 3.5: the median 2.5
        ]
    assert action_costs(times, skip=1) == (2.0, 2.0, 2.5)
    assert action_costs(times)[2] == 3.0  # with the fill
    with pytest.raises(ConfigError, match="no mini-batch from 4 on"):
        action_costs(times, skip=4)


def test_profile_stages_rejects_bad_input():
    from timeprest.sim.profile import profile_stages

    with pytest.raises(ConfigError, match="fewer than the 4 micro-batches"):
        profile_stages(tiny_stages(2), torch.randn(3, 8), 4)
    with pytest.raises(ConfigError, match="both sample_target and loss_fn"):
        profile_stages(tiny_stages(2), torch.randn(4, 8), 2, loss_fn=F.mse_loss)


_PROFILES: dict[tuple[int, int], CostModel] = {}


def _profile(w: int, n: int, x: torch.Tensor, y: torch.Tensor) -> CostModel:
    from timeprest.sim.profile import profile_stages

    if (w, n) not in _PROFILES:
        _PROFILES[(w, n)] = profile_stages(
            tiny_stages(w), x, n, sample_target=y, loss_fn=F.mse_loss, warmup=0, repeats=1
        )
    return _PROFILES[(w, n)]


def _measure(method: str, w: int) -> tuple[SimResult, list]:
    n = resolve(method, w, warn=False).num_microbatches
    t = 4
    g = torch.Generator().manual_seed(1)
    # one separate tensor per mini-batch, as a data loader would hand them over
    batches = [
        (torch.randn(4 * n, 8, generator=g), torch.randn(4 * n, 4, generator=g)) for _ in range(t)
    ]
    cm = _profile(w, n, *batches[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline(
            tiny_stages(w),
            method=method,
            num_microbatches=n,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
            loss_fn=F.mse_loss,
        )
        pipe.train(batches)
        # the emulator orders list-rule schedules with the default costs: simulate that order
        r = simulate(method, w, n, t, cm, order_costs="default")
    return r, pipe.report.stages


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("w", [2, 3, 4])
def test_predicted_weight_memory_equals_measured(method, w):
    r, measured = _measure(method, w)
    for st, rep in zip(r.stages, measured):
        assert r.cost_model.stages[st.stage].weight_bytes == rep.weight_bytes
        assert st.weight_versions == rep.peak_versions, st.stage
        assert st.peak_weight_bytes == rep.peak_weight_bytes, st.stage
        assert st.optimizer_state_bytes == rep.optimizer_state_bytes


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("w", [2, 3, 4])
def test_predicted_activation_peak_within_ten_percent(method, w):
    r, measured = _measure(method, w)
    for s in range(w):
        assert r.stages[s].peak_activation_bytes == pytest.approx(
            measured[s].peak_activation_bytes, rel=0.10
        ), s


def test_engine_profile_counts_what_every_minibatch_pays_not_a_one_off() -> None:
    """A run pays for every action: a slow forward in each mini-batch counts for its share
    of the mini-batch (a median over actions would not see it); one stall in one
    mini-batch is left out (a mean over all actions would spread it over the profile)."""
    import time as _time

    class Sleepy(nn.Module):
        def __init__(self, every: int | None, once: int | None, seconds: float) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.calls, self.every, self.once, self.seconds = 0, every, once, seconds

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if (self.every and self.calls % self.every == 0) or self.calls == self.once:
                _time.sleep(self.seconds)
            return self.lin(x)

    from timeprest.sim.profile import profile_stages

    torch.manual_seed(0)
    x = torch.randn(8, 8)
    # 4 micro-batches per mini-batch: stage 0 sleeps in one forward of each, stage 1 in
    # the first timed forward only (the engine's copies count from 0; 2 mini-batches warm up)
    stages = [Sleepy(4, None, 0.04), Sleepy(None, 9, 0.2)]
    cm = profile_stages(stages, x, 4, warmup=2, repeats=4, method="gpipe")
    assert cm.stages[0].forward_time > 0.007  # 0.04 s over 4 forwards per mini-batch
    assert cm.stages[1].forward_time < 0.005  # 0.2 s once, in one mini-batch of four
