"""schedule/deps.py: the dependency function, the canonical action list and the walk."""

from __future__ import annotations

from timeprest.schedule import B, F, U, deps, expected_actions, parse_program
from timeprest.schedule.deps import walk_programs


def test_forward_needs_the_previous_stage_only():
    assert deps(0, F(2, 1), 3, 2, "minibatch") == []
    assert deps(2, F(2, 1), 3, 2, "minibatch") == [(1, F(2, 1))]


def test_backward_needs_its_forwards_here_and_the_next_stages_backward():
    assert deps(0, B(1), 3, 2, "minibatch") == [(0, F(1, 0)), (0, F(1, 1)), (1, B(1))]
    assert deps(2, B(1), 3, 2, "minibatch") == [(2, F(1, 0)), (2, F(1, 1))]  # last stage
    assert deps(1, B(1, 1), 3, 2, "microbatch") == [(1, F(1, 1)), (2, B(1, 1))]
    assert deps(2, B(1, 1), 3, 2, "microbatch") == [(2, F(1, 1))]


def test_update_needs_every_backward_of_its_minibatch_at_the_stage():
    assert deps(1, U(4), 3, 2, "minibatch") == [(1, B(4))]
    assert deps(1, U(4), 3, 3, "microbatch") == [(1, B(4, 0)), (1, B(4, 1)), (1, B(4, 2))]


def test_expected_actions_in_canonical_order():
    assert expected_actions(0, 2, 2, "minibatch") == parse_program(
        "F0.0 F0.1 B0 U0 F1.0 F1.1 B1 U1"
    )
    assert expected_actions(1, 2, 1, "microbatch") == parse_program("F0.0 F0.1 B0.0 B0.1 U0")


def test_walk_steps_each_action_after_its_deps_and_stops_at_a_deadlock():
    progs = [parse_program("F0.0 B0 U0"), parse_program("F0.0 B0 U0")]
    seen: list[tuple[int, int, str]] = []
    done: set[tuple[int, str]] = set()

    def step(s, i, a, ds):
        assert all((d[0], str(d[1])) in done for d in ds)
        seen.append((s, i, str(a)))
        done.add((s, str(a)))

    assert walk_programs(progs, 1, "minibatch", step) == [3, 3]
    assert sorted(seen) == [(s, i, a) for s in (0, 1) for i, a in enumerate(["F0.0", "B0", "U0"])]
    # stage 1 waits for a forward stage 0 never sends before it needs stage 1's backward
    stuck = [parse_program("B0 F0.0 U0"), parse_program("F0.0 B0 U0")]
    assert walk_programs(stuck, 1, "minibatch", lambda *a: None) == [0, 0]
