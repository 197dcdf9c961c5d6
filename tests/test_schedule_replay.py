"""schedule/replay.py: timelines of per-stage programs, and their closed forms."""

from __future__ import annotations

import pytest

from timeprest.errors import ScheduleError
from timeprest.schedule import Costs, U, build_schedule, parse, parse_program, replay

# (W, N) pairs of the flush closed form
FLUSH_SIZES = sorted(
    {(1, 1), (2, 1), (2, 4), (3, 2), (4, 4), (4, 8), (5, 3)}
    | {(w, n) for w in range(1, 6) for n in (1, 2, 4, 7)}
)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("w", "n"), FLUSH_SIZES)
@pytest.mark.parametrize(("f", "b"), [(1.0, 1.0), (1.0, 2.0)])
def test_flush_bubble_fraction_closed_form(kind, w, n, f, b):
    # every stage idles (W-1)/(N+W-1) of the run: one mini-batch at a time, and over
    # many mini-batches the flush repeats it exactly
    for t in (1, 4, 6):
        tl = build_schedule(kind, w, n, t).timeline(Costs.uniform(w, f, b))
        for st in range(w):
            assert tl.bubble_fraction(st) == pytest.approx((w - 1) / (n + w - 1), abs=1e-12)


def test_replay_places_actions_after_their_deps_plus_the_message_delay():
    progs = [parse_program("F0.0 B0 U0"), parse_program("F0.0 B0 U0")]
    costs = Costs(forward=(1.0, 2.0), backward=(3.0, 4.0), update=(0.5, 0.5), comm=(0.25,))
    tl = replay(progs, costs, 1, "minibatch")
    slots = [[(str(s.action), s.start, s.end) for s in row] for row in tl.stages]
    assert slots[1] == [("F0.0", 1.25, 3.25), ("B0", 3.25, 7.25), ("U0", 7.25, 7.75)]
    assert slots[0] == [("F0.0", 0.0, 1.0), ("B0", 7.5, 10.5), ("U0", 10.5, 11.0)]
    assert tl.makespan == 11.0 and tl.num_stages == 2
    assert tl.busy_time(0) == 1.0 + 3.0 + 0.5
    assert tl.bubble_fraction(0) == pytest.approx(1 - 4.5 / 11.0)
    assert tl.end_of(1, U(0)) == 7.75
    with pytest.raises(KeyError, match="U1 is not in the program of stage 0"):
        tl.end_of(0, U(1))


def test_replay_names_the_stuck_actions_of_a_deadlock():
    progs = [parse_program("B0 F0.0 U0"), parse_program("F0.0 B0 U0")]
    with pytest.raises(ScheduleError, match=r"stage 0 waits at B0 for F0.0@stage 0, B0@stage 1"):
        replay(progs, Costs.uniform(2), 1, "minibatch")
    assert replay([], Costs.uniform(1), 1, "minibatch").makespan == 0.0
    assert parse("B0") == progs[0][0]
