"""schedule/validate.py: what makes per-stage programs a valid schedule."""

from __future__ import annotations

import pytest

from timeprest.errors import ScheduleError
from timeprest.schedule import parse_program, validate


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


def test_validator_needs_one_program_per_stage():
    with pytest.raises(ScheduleError, match="1 programs for 2 stages"):
        validate([parse_program("F0.0 B0 U0")], 2, 1, 1, "minibatch")


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
