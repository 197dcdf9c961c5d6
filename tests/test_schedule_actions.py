"""schedule/actions.py: the action type and its text form."""

from __future__ import annotations

import pytest

from timeprest.errors import ScheduleError
from timeprest.schedule import Action, B, F, U, format_program, parse, parse_program


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


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("X", 0, 0), "unknown action kind"),
        (("F", -1, 0), "negative index"),
        (("B", 0, -2), "negative index"),
        (("F", 2, None), r"needs a micro-batch: F2\.j"),
        (("U", 2, 1), "takes no micro-batch"),
    ],
)
def test_constructing_a_bad_action_is_a_schedule_error(args, match):
    with pytest.raises(ScheduleError, match=match):
        Action(*args)


def test_shorthands_kinds_and_covered_microbatches():
    assert (F(2, 1), B(2), B(2, 1), U(2)) == (
        Action("F", 2, 1),
        Action("B", 2),
        Action("B", 2, 1),
        Action("U", 2),
    )
    assert F(0, 0).is_forward and B(0).is_backward and U(0).is_update
    assert not F(0, 0).is_backward and not U(0).is_forward
    # a whole-mini-batch backward covers every micro-batch; an update covers none
    assert B(3).microbatches(4) == [0, 1, 2, 3]
    assert B(3, 2).microbatches(4) == [2] and F(3, 1).microbatches(4) == [1]
    assert U(3).microbatches(4) == []
    assert repr(B(3, 1)) == "Action('B3.1')"
    # actions order by (kind, mini-batch, micro-batch), so programs sort deterministically
    assert sorted([U(0), F(1, 0), B(0), F(0, 1)]) == [B(0), F(0, 1), F(1, 0), U(0)]
