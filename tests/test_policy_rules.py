"""policy/rules.py: significance functions and the versions a backward reads."""

from __future__ import annotations

import math

import pytest

from timeprest.errors import ConfigError
from timeprest.policy import Policy, Significance, make_significance


def test_significance_functions():
    e = Significance("exp", 1.0)
    assert [e(d) for d in (0, 1, 2)] == [1.0, math.exp(-1), math.exp(-2)]
    i = Significance("inverse", 1.0)
    assert [i(d) for d in (0, 1, 3)] == [1.0, 0.5, 0.25]
    assert Significance("exp", math.inf)(1) == 0.0 and Significance("exp", math.inf)(0) == 1.0
    assert Significance("exp", 0.0)(5) == 1.0
    c = Significance("callable", fn=lambda d: 0.5**d)
    assert c(3) == 0.125
    with pytest.raises(ConfigError):
        Significance("exp", -0.1)
    with pytest.raises(ConfigError):
        Significance("exp", math.nan)


def test_significance_rejects_bad_kinds_degrees_and_callables():
    with pytest.raises(ConfigError, match="unknown significance"):
        Significance("linear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs fn"):
        Significance("callable")
    with pytest.raises(ValueError, match=">= 0"):
        Significance()(-1)
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\]"):
        Significance("callable", fn=lambda d: 2.0)(1)
    assert Significance("inverse", math.inf)(2) == 0.0
    assert Significance("inverse", 2.0).describe() == "inverse (lambda=2)"


def test_make_significance_from_names_callables_and_objects():
    assert make_significance(None, None) == Significance("exp", 1.0)
    assert make_significance("inverse", 3) == Significance("inverse", 3.0)
    s = Significance("inverse", 2.0)
    assert make_significance(s, None) is s
    assert make_significance(s, 0.5) == Significance("inverse", 0.5)

    def half(d: int) -> float:
        return 0.5

    c = make_significance(half, None)
    assert c.kind == "callable" and c(4) == 0.5 and c.describe() == "callable half"
    with pytest.raises(ConfigError, match="unknown significance 'linear'"):
        make_significance("linear", None)


def test_backward_reads_at_the_limits():
    p = Policy("live", "intermediate", significance=Significance("exp", math.inf))
    assert p.backward_reads(2, 4) == (4,) and not p.needs_transient(2, 4)
    p = Policy("live", "intermediate", significance=Significance("exp", 0.0))
    assert p.backward_reads(2, 4) == (2,)
    p = Policy("live", "intermediate")
    assert p.backward_reads(2, 4) == (2, 4) and p.needs_transient(2, 4)
    assert p.backward_reads(3, 3) == (3,)


def test_stashed_and_latest_backward_reads():
    assert Policy("live", "stashed").backward_reads(2, 4) == (2,)
    assert Policy("live", "latest").backward_reads(2, 4) == (4,)
    assert not Policy("live", "latest").needs_transient(2, 4)


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"forward": "ahead"}, "forward rule"),
        ({"backward": "oldest"}, "backward rule"),
        ({"grad_rule": "guess"}, "gradient rule"),
    ],
)
def test_policy_rejects_unknown_rules(kw, what):
    with pytest.raises(ConfigError, match=f"unknown {what}"):
        Policy(**kw)
