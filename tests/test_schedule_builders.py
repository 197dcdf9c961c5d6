"""schedule/builders.py: the four builders, their sizes and the list rule's properties."""

from __future__ import annotations

import warnings

import pytest

from timeprest.errors import ConfigError, MultipleSequenceWarning, ScheduleError
from timeprest.schedule import (
    Costs,
    U,
    build_schedule,
    expected_actions,
    format_program,
    parse_program,
    schedule_from_programs,
    validate,
)


def _build(kind, w, n, t, costs="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        return build_schedule(kind, w, n, t, costs)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "nf1b", "2bw"])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_every_builder_validates(kind, w, n):
    if kind == "2bw" and n < w:
        with pytest.raises(ConfigError, match="N >= W"):
            build_schedule(kind, w, n, 3)
        return
    for costs in ("default", "paper"):
        s = _build(kind, w, n, 5, costs)
        assert len(s.programs) == w
        # validate() is what build_schedule ran; run it again on the result explicitly
        validate(s.programs, w, n, 5, s.backward_unit)
        for st, prog in enumerate(s.programs):
            assert sorted(prog) == sorted(expected_actions(st, n, 5, s.backward_unit))


def test_bad_sizes_are_config_errors():
    for w, n, t in [(0, 1, 1), (1, 0, 1), (1, 1, 0), (-2, 1, 1)]:
        with pytest.raises(ConfigError, match=">= 1"):
            build_schedule("gpipe", w, n, t)
    with pytest.raises(ConfigError, match="unknown schedule"):
        build_schedule("zigzag", 2, 2, 2)


def test_nf1b_warns_about_the_multiple_sequence_problem():
    with pytest.warns(MultipleSequenceWarning, match="multiple-sequence problem"):
        build_schedule("nf1b", 4, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_schedule("nf1b", 4, 3, 3)  # N = W-1: no warning
        build_schedule("nf1b", 4, 2, 3, warn=False)  # asked not to


def test_gpipe_and_1f1b_programs_as_text():
    s = build_schedule("gpipe", 2, 2, 1)
    assert format_program(list(s.programs[0])) == "F0.0 F0.1 B0.1 B0.0 U0"
    s = build_schedule("1f1b", 3, 3, 1)
    assert format_program(list(s.programs[0])) == "F0.0 F0.1 F0.2 B0.0 B0.1 B0.2 U0"
    assert format_program(list(s.programs[1])) == "F0.0 F0.1 B0.0 F0.2 B0.1 B0.2 U0"
    assert format_program(list(s.programs[2])) == "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 U0"


def test_schedule_from_programs_validates():
    s = schedule_from_programs("nf1b", [parse_program("F0.0 B0 U0")], 1, 1)
    assert s.num_stages == 1
    assert s.to_text() == [["F0.0", "B0", "U0"]]
    with pytest.raises(ScheduleError):
        schedule_from_programs("nf1b", [parse_program("B0 F0.0 U0")], 1, 1)


def test_backward_unit_and_deps_of_a_schedule():
    nf = build_schedule("nf1b", 2, 2, 1)
    assert nf.backward_unit == "minibatch"
    assert build_schedule("2bw", 2, 2, 1).backward_unit == "microbatch"
    assert nf.deps(1, U(0)) == [(1, parse_program("B0")[0])]


def _period(schedule, costs="default"):
    """Steady-state time per mini-batch: spacing of updates at the last stage, mid-run."""
    tl = schedule.timeline(costs)
    tc = schedule.num_minibatches
    ends = [tl.end_of(schedule.num_stages - 1, U(t)) for t in range(tc)]
    a, b = tc // 2, tc - 4
    return (ends[b] - ends[a]) / (b - a)


@pytest.mark.parametrize("w", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_list_rule_reaches_the_slowest_stage_bound(w, n):
    # default costs: forward 1, backward 2 per micro-batch, so N(F+B) = 3N per mini-batch
    s = _build("nf1b", w, n, 24)
    assert _period(s) == pytest.approx(3 * n)
    if n >= w:
        s = _build("2bw", w, n, 24)
        assert _period(s) == pytest.approx(3 * n)


@pytest.mark.parametrize("w", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_paper_order_misses_the_bound_under_real_costs(w, n):
    # the TiMePReSt grids (every action one unit) are a poor order once a backward
    # of a whole mini-batch costs what it really does
    s = _build("nf1b", w, n, 24, "paper")
    assert _period(s, "default") > 3 * n * 1.3


@pytest.mark.parametrize("w", [2, 3, 4])
def test_paper_order_is_optimal_below_three_microbatches(w):
    for n in (1, 2):
        s = _build("nf1b", w, n, 24, "paper")
        assert _period(s, "default") == pytest.approx(3 * n)


def test_2bw_paper_order_also_reaches_the_bound():
    # in 2bw the backward unit is one micro-batch, so the paper idealisation keeps the order
    s = build_schedule("2bw", 4, 4, 24, "paper")
    assert _period(s, "default") == pytest.approx(12)


def test_unbalanced_stages_stay_between_the_bound_and_twenty_percent_above():
    costs = Costs(forward=(1.0, 2.0, 1.5), backward=(2.0, 3.0, 2.5))
    s = build_schedule("nf1b", 3, 3, 40, costs)
    tl = s.timeline()
    ends = [tl.end_of(2, U(t)) for t in range(40)]
    period = (ends[30] - ends[10]) / 20
    bound = 3 * (2.0 + 3.0)  # N (F + B) of the slowest stage
    assert bound <= period <= 1.2 * bound


def test_in_flight_limit_of_the_list_rule():
    # at stage s at most W - s mini-batches are between their first forward and their backward
    w, n = 4, 3
    s = build_schedule("nf1b", w, n, 12)
    for st, prog in enumerate(s.programs):
        open_: set[int] = set()
        for a in prog:
            if a.kind == "F":
                open_.add(a.minibatch)
                assert len(open_) <= w - st
            elif a.kind == "B":
                open_.discard(a.minibatch)


def test_update_follows_backward_immediately():
    for kind in ("nf1b", "2bw"):
        s = build_schedule(kind, 3, 3, 6)
        for prog in s.programs:
            for i, a in enumerate(prog):
                if a.kind == "U":
                    prev = prog[i - 1]
                    assert prev.kind == "B" and prev.minibatch == a.minibatch


def test_nf1b_with_one_microbatch_is_pipedream_1f1b():
    s = build_schedule("nf1b", 3, 1, 6)
    assert format_program(list(s.programs[2])) == (
        "F0.0 B0 U0 F1.0 B1 U1 F2.0 B2 U2 F3.0 B3 U3 F4.0 B4 U4 F5.0 B5 U5"
    )
    assert format_program(list(s.programs[0]))[:24] == "F0.0 F1.0 F2.0 B0 U0 F3."
