"""schedule/costs.py: action durations, message delays and the cost modes."""

from __future__ import annotations

import pytest

from timeprest.errors import ConfigError
from timeprest.schedule import B, Costs, F, U, build_schedule, resolve_costs


def test_costs_validation():
    with pytest.raises(ConfigError, match="one per stage"):
        Costs(forward=(1.0, 1.0), backward=(1.0,))
    with pytest.raises(ConfigError, match="> 0"):
        Costs(forward=(0.0,), backward=(1.0,))
    with pytest.raises(ConfigError, match="unknown costs"):
        build_schedule("nf1b", 2, 2, 2, "fast")
    with pytest.raises(ConfigError, match="2 stages"):
        build_schedule("nf1b", 3, 2, 2, Costs.uniform(2))


def test_durations_of_each_mode():
    c = Costs(forward=(1.0, 2.0), backward=(3.0, 4.0), update=(0.5, 0.25), comm=(0.125,))
    assert c.duration(1, F(0, 0), 3) == 2.0
    assert c.duration(1, B(0, 2), 3) == 4.0
    assert c.duration(1, B(0), 3) == 3 * 4.0  # a whole-mini-batch backward covers N
    assert c.duration(0, U(0), 3) == 0.5
    assert c.comm_delay(0, 1) == c.comm_delay(1, 0) == 0.125 and c.comm_delay(1, 1) == 0.0
    paper = resolve_costs("paper", 2)
    assert [paper.duration(0, a, 3) for a in (F(0, 0), B(0), B(0, 1), U(0))] == [1, 1, 1, 0]
    default = resolve_costs(None, 2)
    assert default == resolve_costs("default", 2) == Costs.uniform(2)
    assert (default.forward, default.backward, default.name) == ((1.0, 1.0), (2.0, 2.0), "default")


def test_resolve_costs_reads_per_stage_lists():
    c = resolve_costs([[1, 2], [3, 4]], 2)
    assert (c.forward, c.backward) == ((1.0, 2.0), (3.0, 4.0))
    with pytest.raises(ConfigError, match="expected \\(forward, backward\\) lists"):
        resolve_costs([[1, 2]], 2)
