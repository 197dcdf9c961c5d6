"""Policies and the version plan (integers only)."""

from __future__ import annotations

import math
import warnings

import pytest

from timeprest.errors import ConfigError, MultipleSequenceWarning
from timeprest.policy import METHODS, Policy, Significance, plan_versions, resolve_policy
from timeprest.schedule import build_schedule


def plans(method, w, n, t=12, **kw):
    kind, pol = resolve_policy(method, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        return plan_versions(build_schedule(kind, w, n, t), pol)


def test_presets_match_design_section_6():
    table = {
        "gpipe": ("gpipe", "live", "latest"),
        "1f1b": ("1f1b", "live", "latest"),
        "pipedream": ("nf1b", "live", "stashed"),
        "pipedream-2bw": ("2bw", "previous", "stashed"),
        "timeprest": ("nf1b", "vertical", "latest"),
        "v-timeprest": ("nf1b", "live", "latest"),
        "i-timeprest": ("nf1b", "live", "intermediate"),
    }
    assert set(table) == set(METHODS)
    for name, (kind, fwd, bwd) in table.items():
        k, p = resolve_policy(name)
        assert (k, p.forward, p.backward, p.grad_rule) == (kind, fwd, bwd, "graph")


def test_overrides_one_by_one():
    k, p = resolve_policy(
        "v-timeprest",
        backward="intermediate",
        grad_rule="recompute",
        significance="inverse",
        decay=2.0,
    )
    assert (k, p.forward, p.backward, p.grad_rule) == ("nf1b", "live", "intermediate", "recompute")
    assert p.significance == Significance("inverse", 2.0)
    k, _ = resolve_policy("pipedream", schedule="2bw", forward="previous")
    assert k == "2bw"


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


def test_backward_reads_at_the_limits():
    p = Policy("live", "intermediate", significance=Significance("exp", math.inf))
    assert p.backward_reads(2, 4) == (4,) and not p.needs_transient(2, 4)
    p = Policy("live", "intermediate", significance=Significance("exp", 0.0))
    assert p.backward_reads(2, 4) == (2,)
    p = Policy("live", "intermediate")
    assert p.backward_reads(2, 4) == (2, 4) and p.needs_transient(2, 4)
    assert p.backward_reads(3, 3) == (3,)


@pytest.mark.parametrize("w", [2, 3, 4, 5])
def test_version_counts_per_stage(w):
    assert [p.peak_versions for p in plans("v-timeprest", w, w)] == [1] * w
    assert [p.peak_versions for p in plans("gpipe", w, w)] == [1] * w
    assert [p.peak_versions for p in plans("1f1b", w, w)] == [1] * w
    assert [p.peak_versions for p in plans("pipedream", w, 1)] == [w - s for s in range(w)]
    assert [p.peak_versions for p in plans("pipedream-2bw", w, w)] == [2] * w
    ip = plans("i-timeprest", w, w)
    assert [p.peak_versions for p in ip] == [w - s for s in range(w)]
    assert [p.peak_with_transient for p in ip] == [w - s + 1 for s in range(w - 1)] + [1]
    tp = plans("timeprest", w, w)
    assert tp[0].peak_versions == 1 and all(p.peak_versions > 1 for p in tp[1:])


def test_vertical_sync_uses_stage_zero_versions():
    ps = plans("timeprest", 4, 3)
    for p in ps[1:]:
        assert p.forward_version == ps[0].forward_version


def test_live_forward_versions_count_updates_in_program_order():
    kind, pol = resolve_policy("v-timeprest")
    s = build_schedule(kind, 3, 2, 6)
    (p0, _, _) = plan_versions(s, pol)
    k = 0
    for a in s.programs[0]:
        if a.kind == "U":
            k += 1
        elif a.kind == "F":
            assert p0.forward_version[(a.minibatch, a.microbatch)] == k


def test_previous_versions_lag_by_one():
    ps = plans("pipedream-2bw", 3, 3, t=8)
    for p in ps:
        for (t, _j), v in p.forward_version.items():
            assert v == max(0, t - 1)
