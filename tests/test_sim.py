"""The simulator: cost model file format, closed forms, memory model, staleness, outputs.

Mirrors ``timeprest/sim``: costmodel, simulate (timing), memory, trace,
gantt, profile, and the memory model checked against the emulator's
measurements.
"""

from __future__ import annotations

import json
import struct
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timeprest import Pipeline
from timeprest.errors import ConfigError
from timeprest.policy import METHODS, get_method
from timeprest.sim import (
    CostModel,
    SimResult,
    StageCost,
    chrome_trace,
    simulate,
    steady_state,
)
from timeprest.sim.costmodel import stage_costs

ASYNC = ("pipedream", "pipedream-2bw", "timeprest", "v-timeprest", "i-timeprest")


def sim(
    method: str, w: int, n: int | None = None, t: int = 12, cm: CostModel | None = None
) -> SimResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nF1B with N < W-1 warns; not what these tests are about
        return simulate(method, w, n, t, cm)


def sized(w: int, **kw: float) -> CostModel:
    """Uniform unit costs with distinct sizes, so each memory component is recognisable."""
    return CostModel.uniform(
        w,
        kw.get("forward", 1.0),
        kw.get("backward", 2.0),
        kw.get("comm", 0.0),
        weight_bytes=1000,
        optimizer_state_bytes=100000,
        saved_activation_bytes=10,
        output_bytes=1,
    )


# -- cost model ------------------------------------------------------------------


def test_cost_model_json_round_trip(tmp_path):
    cm = CostModel(
        stage_costs(
            [0.1, 0.2],
            [0.3, 0.4],
            update_time=[0.01, 0.02],
            output_bytes=[4096, 0],
            weight_bytes=[10, 20],
            optimizer_state_bytes=[30, 40],
            saved_activation_bytes=[50, 60],
        ),
        input_bytes=128,
        bandwidth=1024.0,
        latency=0.5,
        meta={"model": "tiny"},
    )
    path = tmp_path / "costs.json"
    cm.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["format"] == "timeprest-costs"
    back = CostModel.load(path)
    assert back == cm and back.meta == {"model": "tiny"}
    costs = back.to_costs()
    assert costs.forward == (0.1, 0.2) and costs.backward == (0.3, 0.4)
    assert costs.update == (0.01, 0.02)
    assert costs.comm == (0.5 + 4096 / 1024.0,)  # latency + bytes / bandwidth


def test_uniform_comm_time_is_the_latency():
    cm = CostModel.uniform(3, 1.0, 2.0, 0.25, output_bytes=10**9)
    assert cm.to_costs().comm == (0.25, 0.25)
    assert cm.stages[-1].output_bytes == 0  # the last stage sends nothing forward


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d.pop("version"), "version None"),
        (lambda d: d.update(stages=[]), "non-empty list"),
        (lambda d: d["stages"][0].pop("forward_time"), "stage 0: missing 'forward_time'"),
        (lambda d: d["stages"][1].update(backward_time=-1.0), "stage 1: backward_time must be"),
        (lambda d: d["stages"][0].update(update_time=-0.1), "update_time must be"),
        (lambda d: d["stages"][0].update(weight_bytes=-5), "weight_bytes must be"),
        (lambda d: d["stages"][0].update(weight_bytes=1.5), "weight_bytes must be"),
        (lambda d: d["stages"][0].update(colour="red"), "unknown keys ['colour']"),
        (lambda d: d.update(link={"bandwidth": 0}), "bandwidth must be > 0"),
        (lambda d: d.update(link={"latency": -1}), "latency must be"),
        (lambda d: d.update(format="other"), "expected 'timeprest-costs'"),
    ],
)
def test_cost_model_rejects_bad_files(tmp_path, mutate, message):
    data = CostModel.uniform(2).to_json()
    mutate(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        CostModel.load(path)
    assert message in str(exc.value) and "c.json" in str(exc.value)


def test_cost_model_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CostModel.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "stages": [')
    with pytest.raises(ConfigError, match="not valid JSON"):
        CostModel.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        CostModel.load(bad)


def test_stage_cost_rejects_zero_and_nan_times():
    with pytest.raises(ConfigError, match="forward_time"):
        StageCost(forward_time=0.0, backward_time=1.0)
    with pytest.raises(ConfigError, match="backward_time"):
        StageCost(forward_time=1.0, backward_time=float("nan"))


def test_simulate_rejects_a_cost_model_of_the_wrong_size():
    with pytest.raises(ConfigError, match="3 stages but 4"):
        simulate("gpipe", 4, 2, 2, CostModel.uniform(3))


# -- timing: closed forms ----------------------------------------------------------


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 2, 4, 7])
@pytest.mark.parametrize(("f", "b"), [(1.0, 1.0), (1.0, 2.0)])
def test_flush_bubble_fraction(method, w, n, f, b):
    r = sim(method, w, n, 4, CostModel.uniform(w, f, b))
    for st in r.stages:
        assert st.bubble_fraction == pytest.approx((w - 1) / (n + w - 1), abs=1e-12)
        assert st.steady_bubble_fraction == pytest.approx((w - 1) / (n + w - 1), abs=1e-12)
    # a flush schedule runs one mini-batch at a time: (N + W - 1) slots of F + B
    assert r.time_per_minibatch == pytest.approx((n + w - 1) * (f + b))
    assert r.throughput == pytest.approx(1 / r.time_per_minibatch)


@pytest.mark.parametrize("method", ASYNC)
@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_async_balanced_reaches_the_slowest_stage_bound(method, w, n):
    if method == "pipedream-2bw" and n < w:
        pytest.skip("2bw needs N >= W")
    r = sim(method, w, n, 16, CostModel.uniform(w, 1.0, 2.0))
    assert r.steady.periodic and r.steady.period == 1
    assert r.time_per_minibatch == pytest.approx(n * 3.0)  # max_s N (F_s + B_s)
    assert r.bound == pytest.approx(n * 3.0) and r.bound_ratio == pytest.approx(1.0)
    assert all(st.steady_bubble_fraction == pytest.approx(0.0, abs=1e-12) for st in r.stages)
    # the whole-run bubble is only fill and drain, and shrinks as T grows
    longer = sim(method, w, n, 32, CostModel.uniform(w, 1.0, 2.0))
    assert longer.stages[0].bubble_fraction <= r.stages[0].bubble_fraction + 1e-12


# Measured ratios of the steady-state time per mini-batch to max_s N(F_s+B_s)
# with one slow stage (forward/backward times ``scale * (1, 2)``), for the
# list-rule order: the bound is not always reached when stages are
# unbalanced. These pin the numbers docs/simulator.md reports.
UNBALANCED = [
    ((1, 2), 2, 1.0),
    ((2, 1), 2, 12.5 / 12),
    ((1, 2, 1), 3, 18.5 / 18),
    ((2, 1, 1), 3, 18.666666666666668 / 18),
    ((1, 2, 1, 1), 4, 24.666666666666668 / 24),
    ((2, 1, 1, 1), 4, 24.75 / 24),
    ((1, 1, 1, 2), 4, 1.0),
]


@pytest.mark.parametrize(("scale", "n", "ratio"), UNBALANCED)
def test_nf1b_unbalanced_ratio_to_bound(scale, n, ratio):
    w = len(scale)
    cm = CostModel(stage_costs([float(x) for x in scale], [2.0 * x for x in scale]))
    r = sim("v-timeprest", w, n, 32, cm)
    assert r.steady.periodic
    assert r.bound == pytest.approx(n * 3.0 * max(scale))
    assert r.bound_ratio == pytest.approx(ratio)
    assert r.bound_ratio >= 1.0 - 1e-12  # no schedule beats its slowest stage


def test_steady_state_finds_a_repeating_pattern():
    # intervals 12, 25, 12, 25, ... after a fill: the mean over whole periods is 18.5
    ends = [30.0]
    for i in range(15):
        ends.append(ends[-1] + (12.0 if i % 2 == 0 else 25.0))
    st = steady_state(ends)
    assert st.period == 2 and st.interval == pytest.approx(18.5)
    assert (st.last - st.first) % 2 == 0
    # nothing repeats: period 0, mean over the middle half
    ragged = [0.0, 1.0, 3.0, 6.0, 10.0, 15.0, 21.0, 28.0]
    st = steady_state(ragged)
    assert st.period == 0 and (st.first, st.last) == (2, 5)
    assert st.interval == pytest.approx((15.0 - 3.0) / 3)
    assert steady_state([5.0]).interval == 5.0


def test_comm_time_delays_but_does_not_change_the_steady_pace():
    base = sim("v-timeprest", 4, 4, 32, CostModel.uniform(4, 1.0, 2.0))
    slow = sim("v-timeprest", 4, 4, 32, CostModel.uniform(4, 1.0, 2.0, 0.5))
    assert slow.makespan > base.makespan
    # every forward at stage s > 0 starts at least C after the previous stage's ended
    for s in range(1, 4):
        prev = {sl.action: sl.end for sl in slow.timeline.stages[s - 1]}
        for sl in slow.timeline.stages[s]:
            if sl.action.is_forward:
                assert sl.start >= prev[sl.action] + 0.5 - 1e-12


def test_order_costs_paper_replayed_under_real_costs_is_slower():
    good = simulate("v-timeprest", 4, 4, 32, CostModel.uniform(4))
    paper = simulate("v-timeprest", 4, 4, 32, CostModel.uniform(4), order_costs="paper")
    assert paper.time_per_minibatch > good.time_per_minibatch
    with pytest.raises(ConfigError, match="order costs"):
        simulate("v-timeprest", 4, 4, 4, order_costs="fast")  # type: ignore[arg-type]


# -- weight versions and staleness (DESIGN section 6) --------------------------------


@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
def test_weight_versions_per_method(w):
    n = max(w, 2)
    for m in ("gpipe", "1f1b", "v-timeprest"):
        r = sim(m, w, n)
        assert [s.weight_versions for s in r.stages] == [1] * w, m
        assert [s.weight_versions_with_transient for s in r.stages] == [1] * w, m
    r = sim("pipedream", w, 1)
    assert [s.weight_versions for s in r.stages] == [w - s for s in range(w)]
    if w > 1:
        r = sim("pipedream-2bw", w, n)
        assert [s.weight_versions for s in r.stages] == [2] * w
    r = sim("i-timeprest", w, n)
    assert [s.weight_versions for s in r.stages] == [w - s for s in range(w)]
    assert [s.weight_versions_with_transient for s in r.stages] == [
        w - s + (1 if s < w - 1 else 0) for s in range(w)
    ]
    r = sim("timeprest", w, n)
    assert r.stages[0].weight_versions == 1
    assert all(s.weight_versions > 1 for s in r.stages[1:])


def test_staleness_per_backward():
    for m in ("gpipe", "1f1b"):
        r = sim(m, 4, 4)
        assert all(s.max_staleness == 0 for s in r.stages)
    r = sim("pipedream", 4, 1, 16)
    # PipeDream: W - 1 - s updates happen between a forward and its backward in steady state
    assert [s.max_staleness for s in r.stages] == [3, 2, 1, 0]
    st = r.stages[0].staleness
    assert len(st) == 16 and st[(0, 0)] == 0 and st[(8, 0)] == 3
    r = sim("pipedream-2bw", 4, 4, 16)
    assert [s.max_staleness for s in r.stages] == [1, 1, 1, 1]
    # every backward of every micro-batch has a degree of staleness
    r = sim("v-timeprest", 3, 3, 5)
    assert all(len(s.staleness) == 15 for s in r.stages)
    assert r.stages[-1].max_staleness == 0


# -- memory model ------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("w", [2, 3, 4])
def test_memory_weights_follow_the_version_plan(method, w):
    n = get_method(method).default_microbatches or w
    r = sim(method, w, n, 8, sized(w))
    for st, plan, row in zip(r.stages, r.plans, r.timeline.stages):
        mem = st.memory
        # at the start of every forward and backward the stage holds exactly the planned versions
        for i, sl in enumerate(row):
            if sl.action.is_update:
                continue
            k = max(x for x, t in enumerate(mem.times) if t <= sl.start)
            assert mem.versions[k] == plan.held[i], (st.stage, str(sl.action))
        assert st.peak_weight_bytes == plan.peak_with_transient * 1000
        assert mem.peak_versions == plan.peak_versions
        # at the end only the latest version and the optimizer state remain
        assert mem.total[-1] == 1000 + 100000
        assert mem.optimizer == st.optimizer_state_bytes == 100000


def test_memory_activation_peaks_closed_forms():
    w, n = 4, 4
    gpipe = sim("gpipe", w, n, 4, sized(w))
    assert [s.peak_activation_bytes for s in gpipe.stages] == [10 * n] * w
    ofob = sim("1f1b", w, n, 4, sized(w))
    assert [s.peak_activation_bytes for s in ofob.stages] == [10 * min(w - s, n) for s in range(w)]
    pd = sim("pipedream", w, 1, 16, sized(w))
    assert [s.peak_activation_bytes for s in pd.stages] == [10 * (w - s) for s in range(w)]
    # nF1B keeps up to W - s whole mini-batches in flight
    v = sim("v-timeprest", w, n, 16, sized(w))
    assert [s.peak_activation_bytes for s in v.stages] == [10 * n * (w - s) for s in range(w)]


def test_memory_received_buffers_and_peak():
    w, n = 3, 3
    r = sim("gpipe", w, n, 2, sized(w, comm=0.5))
    # with a delay, a gradient waits in a buffer while the stage still works on others
    assert r.stages[0].peak_received_bytes >= 1
    assert r.stages[-1].peak_received_bytes <= n  # inputs only, one byte each
    for st in r.stages:
        assert st.peak_memory_bytes == st.memory.peak == max(st.memory.total)
        assert st.peak_memory_bytes >= (
            st.peak_weight_bytes + st.optimizer_state_bytes
        )  # weights and optimizer state are always there


def test_recompute_saves_the_stage_input():
    from timeprest.policy import Policy

    w, n = 3, 3
    cm = CostModel(
        stage_costs(
            [1.0] * w,
            [2.0] * w,
            saved_activation_bytes=[100] * w,
            output_bytes=[7, 7, 0],
        ),
        input_bytes=5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = simulate("gpipe", w, n, 2, cm, policy=Policy("live", "latest", "recompute"))
    assert [s.peak_activation_bytes for s in r.stages] == [5 * n, 7 * n, 7 * n]
    # the recomputed forward of one micro-batch is live during its backward
    assert max(r.stages[1].memory.workspace) == 100


def test_to_json_has_per_stage_lists():
    r = sim("i-timeprest", 3, 3, 6, sized(3))
    d = json.loads(json.dumps(r.to_json()))
    for key in ("bubble_fraction", "weight_versions", "peak_memory_bytes", "max_staleness"):
        assert len(d[key]) == 3
    assert d["time_per_minibatch"] == pytest.approx(9.0)
    assert d["throughput"] == pytest.approx(1 / 9.0)
    assert len(d["slots"]) == sum(len(p) for p in r.schedule.programs)
    assert CostModel.from_json(d["cost_model"]) == r.cost_model


def test_labels_show_the_versions_read():
    r = sim("i-timeprest", 3, 3, 6)
    labels = {r.label(s, i) for s in range(3) for i in range(len(r.schedule.programs[s]))}
    assert "F0.0 v0" in labels
    assert any("+" in lb for lb in labels)  # an intermediate of two versions
    r = sim("pipedream", 3, 1, 6)
    assert r.label(0, 0) == "F0.0 v0"


# -- Chrome trace and Gantt chart ------------------------------------------------------


def test_chrome_trace_structure():
    r = sim("pipedream", 3, 1, 6, sized(3))
    tr = json.loads(json.dumps(chrome_trace(r)))
    ev = tr["traceEvents"]
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"stage 0", "stage 1", "stage 2"}
    spans = [e for e in ev if e["ph"] == "X"]
    assert len(spans) == sum(1 for p in r.schedule.programs for a in p if not a.is_update)
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in spans)
    instants = [e for e in ev if e["ph"] == "i"]
    assert len(instants) == 3 * 6  # the zero-time updates
    counters = [e for e in ev if e["ph"] == "C"]
    assert {e["name"] for e in counters} == {f"memory stage {s} (bytes)" for s in range(3)}
    b = next(e for e in spans if e["args"]["action"] == "B5" and e["tid"] == 0)
    assert b["args"]["staleness"] == [2] and b["name"] == "B5 v3"


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_gantt_png(tmp_path):
    pytest.importorskip("matplotlib")
    from timeprest.sim.gantt import draw_gantt

    out = tmp_path / "g.png"
    draw_gantt(sim("i-timeprest", 3, 3, 4, sized(3)), out)
    wpx, hpx = _png_size(out)
    assert wpx > hpx > 100
    # without sizes the lower panel shows versions; still a picture
    draw_gantt(sim("pipedream", 3, 1, 6), tmp_path / "p.png")
    assert _png_size(tmp_path / "p.png")[0] > 100


def test_gantt_without_matplotlib_is_a_config_error(monkeypatch, tmp_path):
    from timeprest.sim.gantt import draw_gantt

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match=r"pip install timeprest\[plot\]"):
        draw_gantt(sim("gpipe", 2, 2, 2), tmp_path / "x.png")


# -- profiling and the memory model against the emulator ---------------------------------------


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
        kinds = [k for k, _, _, _ in r.action_times]
        assert kinds.count("F") == n * t and kinds.count("U") == t
        # a B action over the whole mini-batch counts its N micro-batches
        assert sum(c for k, _, c, _ in r.action_times if k == "B") == n * t
        assert sorted({mb for _, mb, _, _ in r.action_times}) == list(range(t))
        assert all(sec > 0 for _, _, _, sec in r.action_times)


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
    n = get_method(method).default_microbatches or w
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


def test_fit_link_separates_latency_and_bandwidth():
    from timeprest.sim.link import fit_link

    # one_way = 1e-4 + size / 1e9
    lat, bw = fit_link((4, 1e-4 + 4 / 1e9), (10**6, 1e-4 + 10**6 / 1e9))
    assert lat == pytest.approx(1e-4) and bw == pytest.approx(1e9)
    # a large message no slower than the small one: infinite bandwidth
    assert fit_link((4, 2e-4), (10**6, 1e-4)) == (1e-4, None)
    with pytest.raises(ConfigError, match="must be larger"):
        fit_link((10, 1.0), (10, 2.0))


def test_measure_link_on_loopback():
    from timeprest.sim.link import measure_link

    link = measure_link(1 << 20, repeats=5)
    assert 0 <= link.latency < 0.5
    assert link.bandwidth is None or link.bandwidth > 1e6  # over a megabyte a second
    assert 0 < link.overhead < 0.5  # moving a mebibyte costs some CPU time
    with pytest.raises(ConfigError, match="more than 4 bytes"):
        measure_link(4)


def test_message_overhead_adds_to_the_stages_that_send_or_receive():
    from dataclasses import replace

    cm = replace(CostModel.uniform(3, 1.0, 2.0, 0.25), overhead=0.5)
    costs = cm.to_costs()
    # stage 0 and 2 have one neighbour, stage 1 two; one message each per micro-batch
    assert costs.forward == (1.5, 2.0, 1.5) and costs.backward == (2.5, 3.0, 2.5)
    assert costs.comm == (0.25, 0.25)
    assert CostModel.from_json(cm.to_json()) == cm
    with pytest.raises(ConfigError, match="message overhead"):
        replace(cm, overhead=-1.0)
    # a pipeline's time per mini-batch grows with it: 1f1b at unit costs, W=3, N=3
    base = simulate("1f1b", 3, 3, 6, CostModel.uniform(3, 1.0, 2.0)).time_per_minibatch
    slower = simulate("1f1b", 3, 3, 6, replace(CostModel.uniform(3, 1.0, 2.0), overhead=0.5))
    assert slower.time_per_minibatch > base
