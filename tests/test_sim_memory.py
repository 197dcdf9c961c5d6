"""sim/memory.py: the memory model, in closed form and against the version plan."""

from __future__ import annotations

import warnings

import pytest

from sim_cases import sim, sized
from timeprest.policy import METHODS, Policy, resolve
from timeprest.sim import CostModel, MemoryTimeline, memory_timelines, simulate
from timeprest.sim.costmodel import stage_costs


def value_at(mem: MemoryTimeline, series: str, t: float) -> int:
    """The value of one series of ``mem`` on the step that holds time ``t``."""
    values = mem.total if series == "total" else getattr(mem, series)
    return values[max(i for i, ti in enumerate(mem.times) if ti <= t)]


# -- closed forms ------------------------------------------------------------------


def test_one_stage_gpipe_step_by_step():
    # W = 1, N = 3: forwards at 0, 1, 2; backwards (2 units each, reversed) end at 5, 7, 9;
    # each micro-batch holds its 10 saved bytes from its forward to its backward's end
    r = sim("gpipe", 1, 3, 1, sized(1))
    m = r.stages[0].memory
    assert m.times == (0.0, 1.0, 2.0, 5.0, 7.0, 9.0)
    assert m.activations == (10, 20, 30, 20, 10, 0)
    assert m.versions == (1,) * 6 and m.weights == (1000,) * 6  # U0 updates in place
    assert m.transient == m.workspace == m.received == (0,) * 6
    assert m.total == tuple(1000 + a + 100000 for a in m.activations)
    assert m.peak == r.stages[0].peak_memory_bytes == 1000 + 30 + 100000
    assert (m.peak_activation_bytes, m.peak_received_bytes, m.peak_versions) == (30, 0, 1)


def test_received_messages_wait_in_buffers_for_their_reader():
    # W = 2, N = 1, messages of 1 byte take 0.5: stage 1's forward starts the moment its
    # input arrives (no buffer), stage 0's gradient arrives at 5.0 and is read until 7.0
    r = sim("gpipe", 2, 1, 1, sized(2, comm=0.5))
    m0, m1 = (s.memory for s in r.stages)
    assert m0.times == (0.0, 5.0, 7.0)
    assert m0.received == (0, 1, 0) and m0.activations == (10, 10, 0)
    assert m1.times == (0.0, 1.5, 4.5, 7.0)
    assert m1.received == (0, 0, 0, 0) and m1.activations == (0, 10, 0, 0)
    assert [s.peak_received_bytes for s in r.stages] == [1, 0]


def test_a_stashed_version_lives_until_its_last_reader():
    # PipeDream, W = 2, N = 1: stage 0 runs F0 [0,1) F1 [1,2) B0 [4,6) U0 F2 [6,7) B1 [7,9)
    # U1 B2 [10,12) U2. U0 stashes v0 for B1 (freed at 9, when v2 is born); U1 stashes v1
    # for B2 (freed at 12, when U2 turns v2 into v3 in place)
    r = sim("pipedream", 2, 1, 3, sized(2))
    m = r.stages[0].memory
    assert [value_at(m, "versions", t) for t in (0, 3, 6, 8, 9, 11, 12)] == [1, 1, 2, 2, 2, 2, 1]
    assert [value_at(m, "weights", t) for t in (3, 6, 12)] == [1000, 2000, 1000]
    # saved activations: F0 until 6, F1 until 9, F2 from 6 until 12
    assert [value_at(m, "activations", t) for t in (0, 1, 6, 9, 12)] == [10, 20, 20, 10, 0]
    assert r.stages[1].memory.peak_versions == 1


def test_memory_timelines_is_what_the_simulator_reports():
    r = sim("i-timeprest", 3, 3, 6, sized(3, comm=0.25))
    direct = memory_timelines(r.timeline, r.plans, r.cost_model, r.costs, 3, "graph")
    assert direct == [s.memory for s in r.stages]
    assert any(max(m.transient) == 1000 for m in direct[:-1])  # intermediate weights
    assert max(direct[-1].transient) == 0  # the last stage's backward is never stale


# -- against the version plan and per method -----------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("w", [2, 3, 4])
def test_memory_weights_follow_the_version_plan(method, w):
    n = resolve(method, w, warn=False).num_microbatches
    r = sim(method, w, n, 8, sized(w))
    for st, plan, row in zip(r.stages, r.plans, r.timeline.stages):
        mem = st.memory
        # at the start of every forward and backward the stage holds exactly the planned versions
        for i, sl in enumerate(row):
            if sl.action.is_update:
                continue
            assert value_at(mem, "versions", sl.start) == plan.held[i], (st.stage, str(sl.action))
        assert st.peak_weight_bytes == plan.peak_with_transient * 1000
        assert mem.peak_versions == plan.peak_versions
        # at the end only the latest version and the optimizer state remain
        # (plus the remedy buffers of docs/design.md section 12, kept all the time)
        assert mem.total[-1] == 1000 * (1 + plan.extra_buffers) + 100000
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


def test_cost_model_without_sizes_predicts_no_bytes():
    r = sim("v-timeprest", 3, 3, 4)
    assert all(s.peak_memory_bytes == 0 for s in r.stages)
    assert [s.memory.peak_versions for s in r.stages] == [1, 1, 1]
