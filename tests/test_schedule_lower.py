"""Lowering: programs with their messages as explicit receive and send actions."""

from __future__ import annotations

import pytest

from timeprest.errors import ScheduleError
from timeprest.schedule import build_schedule, schedule_from_programs
from timeprest.schedule.actions import parse_program
from timeprest.schedule.lower import Lowered, check_channels, lower


def test_gpipe_stage_programs_as_text() -> None:
    low = lower(build_schedule("gpipe", 3, 2, 1))
    assert low.text(0) == "F0.0 >F0.0 F0.1 >F0.1 <B0.1 B0.1 <B0.0 B0.0 U0"
    assert low.text(1) == ("<F0.0 F0.0 >F0.0 <F0.1 F0.1 >F0.1 <B0.1 B0.1 >B0.1 <B0.0 B0.0 >B0.0 U0")
    assert low.text(2) == "<F0.0 F0.0 <F0.1 F0.1 B0.1 >B0.1 B0.0 >B0.0 U0"


def test_nf1b_backward_lowers_per_microbatch() -> None:
    """B{t} of nF1B: one receive, compute and send per micro-batch, all tagged with B{t}."""
    sched = schedule_from_programs(
        "nf1b",
        [parse_program("F0.0 F0.1 B0 U0"), parse_program("F0.0 F0.1 B0 U0")],
        num_microbatches=2,
        num_minibatches=1,
    )
    low = lower(sched)
    assert low.text(0) == "F0.0 >F0.0 F0.1 >F0.1 <B0.0 B0.0 <B0.1 B0.1 U0"
    assert low.text(1) == "<F0.0 F0.0 <F0.1 F0.1 B0.0 >B0.0 B0.1 >B0.1 U0"
    backward = [op for op in low.programs[0] if op.action.kind == "B"]
    assert {str(op.action) for op in backward} == {"B0"}
    assert [op.first for op in backward] == [True, False, False, False]
    assert [op.last for op in backward] == [False, False, False, True]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "nf1b", "2bw"])
def test_every_send_is_received_in_order(kind: str) -> None:
    w, n, t = 4, 4, 5
    low = lower(build_schedule(kind, w, n, t))
    for s in range(w - 1):
        sent = [m for m in low.messages(s, "send") if m.dst == s + 1]
        assert sent == [m for m in low.messages(s + 1, "recv") if m.src == s]
        assert len(sent) == n * t
        grads = [m for m in low.messages(s + 1, "send") if m.dst == s]
        assert grads == [m for m in low.messages(s, "recv") if m.src == s + 1]
    # every op belongs to an action that opens and closes once
    for prog in low.programs:
        assert sum(op.first for op in prog) == sum(op.last for op in prog)


def test_a_permuted_receive_order_is_a_schedule_error() -> None:
    low = lower(build_schedule("gpipe", 2, 2, 1))
    prog = list(low.programs[1])
    i, j = [k for k, op in enumerate(prog) if op.op == "recv"][:2]
    prog[i], prog[j] = prog[j], prog[i]
    bad = Lowered(low.schedule, (low.programs[0], tuple(prog)))
    with pytest.raises(ScheduleError, match=r"stages 0 and 1 disagree.*F0\.0.*F0\.1"):
        check_channels(bad)
