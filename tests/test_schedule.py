"""Schedules: text form, builders, validator, replay closed forms, list-rule properties."""

from __future__ import annotations

import warnings

import pytest

from timeprest.errors import ConfigError, MultipleSequenceWarning, ScheduleError
from timeprest.schedule import (
    Action,
    Costs,
    U,
    build_schedule,
    expected_actions,
    format_program,
    grid_cells,
    parse,
    parse_program,
    schedule_from_programs,
    validate,
)


def _build(kind, w, n, t, costs="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        return build_schedule(kind, w, n, t, costs)


@pytest.mark.parametrize("text", ["F0.0", "F3.1", "B3", "B12.5", "U3", "U0"])
def test_text_form_round_trips(text):
    a = parse(text)
    assert str(a) == text
    assert parse(str(a)) == a


def test_text_form_of_constructed_actions():
    assert str(Action("F", 3, 1)) == "F3.1"
    assert str(Action("B", 3)) == "B3"
    assert parse_program("F0.0 F0.1 B0 U0") == [
        Action("F", 0, 0),
        Action("F", 0, 1),
        Action("B", 0),
        Action("U", 0),
    ]
    assert format_program(parse_program("F0.0  B0 U0")) == "F0.0 B0 U0"


@pytest.mark.parametrize("bad", ["X1", "F1", "U1.2", "F-1.0", "", "F1.2.3"])
def test_bad_text_is_a_schedule_error(bad):
    with pytest.raises(ScheduleError):
        parse(bad)


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


def test_gpipe_and_1f1b_programs_as_text():
    s = build_schedule("gpipe", 2, 2, 1)
    assert format_program(list(s.programs[0])) == "F0.0 F0.1 B0.1 B0.0 U0"
    s = build_schedule("1f1b", 3, 3, 1)
    assert format_program(list(s.programs[0])) == "F0.0 F0.1 F0.2 B0.0 B0.1 B0.2 U0"
    assert format_program(list(s.programs[1])) == "F0.0 F0.1 B0.0 F0.2 B0.1 B0.2 U0"
    assert format_program(list(s.programs[2])) == "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 U0"


def test_validator_rejects_missing_duplicate_and_misordered_actions():
    good = [parse_program("F0.0 F0.1 B0.1 B0.0 U0")]
    validate(good, 1, 2, 1, "microbatch")
    with pytest.raises(ScheduleError, match=r"stage 0: missing action B0.0"):
        validate([parse_program("F0.0 F0.1 B0.1 U0")], 1, 2, 1, "microbatch")
    with pytest.raises(ScheduleError, match=r"appears 2 times"):
        validate([parse_program("F0.0 F0.0 F0.1 B0.1 B0.0 U0")], 1, 2, 1, "microbatch")
    with pytest.raises(ScheduleError, match=r"U0 comes before B0.0"):
        validate([parse_program("F0.0 F0.1 B0.1 U0 B0.0")], 1, 2, 1, "microbatch")
    with pytest.raises(ScheduleError, match=r"unexpected action B0 "):
        validate([parse_program("F0.0 F0.1 B0 U0")], 1, 2, 1, "microbatch")


def test_validator_finds_a_cross_stage_deadlock_and_prints_a_grid():
    # stage 1 insists on mini-batch 1 first; stage 0 only sends mini-batch 1 after
    # the backward of mini-batch 0 arrives
    progs = [
        parse_program("F0.0 B0 U0 F1.0 B1 U1"),
        parse_program("F1.0 B1 U1 F0.0 B0 U0"),
    ]
    with pytest.raises(ScheduleError, match="deadlock") as err:
        validate(progs, 2, 1, 2, "minibatch")
    text = str(err.value)
    assert "stage 1 waits at F1.0" in text
    assert "stage 0 |" in text  # the grid


def test_schedule_from_programs_validates():
    s = schedule_from_programs("nf1b", [parse_program("F0.0 B0 U0")], 1, 1)
    assert s.num_stages == 1
    with pytest.raises(ScheduleError):
        schedule_from_programs("nf1b", [parse_program("B0 F0.0 U0")], 1, 1)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("w,n", [(1, 1), (2, 1), (2, 4), (3, 2), (4, 4), (4, 8), (5, 3)])
def test_flush_bubble_fraction_closed_form(kind, w, n):
    # one mini-batch with every action one unit long: bubble (W-1)/(N+W-1)
    s = build_schedule(kind, w, n, 1)
    tl = s.timeline(Costs.uniform(w, 1.0, 1.0))
    for st in range(w):
        assert tl.bubble_fraction(st) == pytest.approx((w - 1) / (n + w - 1))
    # and over many mini-batches the flush repeats it exactly
    s = build_schedule(kind, w, n, 6)
    tl = s.timeline(Costs.uniform(w, 1.0, 1.0))
    assert tl.bubble_fraction(0) == pytest.approx((w - 1) / (n + w - 1))


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


def test_grid_cells_repeat_an_action_over_its_duration():
    s = build_schedule("nf1b", 2, 2, 2)
    cells = grid_cells(s.timeline())
    row0 = cells[0]
    assert row0[:2] == ["F0.0", "F0.1"]
    b0 = [c for c in row0 if c == "B0"]
    assert len(b0) == 4  # B{t} lasts N * 2 units
    assert all(c is None or not c.startswith("U") for r in cells for c in r)


def test_costs_validation():
    with pytest.raises(ConfigError, match="one per stage"):
        Costs(forward=(1.0, 1.0), backward=(1.0,))
    with pytest.raises(ConfigError, match="> 0"):
        Costs(forward=(0.0,), backward=(1.0,))
    with pytest.raises(ConfigError, match="unknown costs"):
        build_schedule("nf1b", 2, 2, 2, "fast")
    with pytest.raises(ConfigError, match="2 stages"):
        build_schedule("nf1b", 3, 2, 2, Costs.uniform(2))
