"""policy/methods.py: the method presets, overrides and the one resolver of (method, W, N)."""

from __future__ import annotations

import sys
import warnings

import pytest

from timeprest.errors import ConfigError, MultipleSequenceWarning
from timeprest.policy import DEFAULT_METHOD, METHODS, Significance, get_method, method_names
from timeprest.policy.methods import (
    default_microbatches,
    resolve,
    resolve_policy,
    warn_multiple_sequence,
)


def test_presets_match_design_section_6():
    table = {
        "gpipe": ("gpipe", "live", "latest"),
        "1f1b": ("1f1b", "live", "latest"),
        "pipedream": ("nf1b", "live", "stashed"),
        "pipedream-2bw": ("2bw", "previous", "stashed"),
        "timeprest": ("nf1b", "vertical", "latest"),
        "v-timeprest": ("nf1b", "live", "latest"),
        "i-timeprest": ("nf1b", "live", "intermediate"),
        # section 12: the other remedies (their extra parts are checked in test_remedies.py)
        "weight-prediction": ("nf1b", "predicted", "latest"),
        "pipemare": ("nf1b", "live", "velocity"),
        "pipedream-lr": ("nf1b", "live", "stashed"),
        "dc-asgd": ("nf1b", "live", "stashed"),
        "gap-aware": ("nf1b", "live", "stashed"),
        "i-timeprest-velocity": ("nf1b", "live", "intermediate-velocity"),
    }
    assert set(table) == set(METHODS) == set(method_names())
    assert DEFAULT_METHOD in METHODS
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


def test_unknown_method_and_schedule_are_config_errors():
    with pytest.raises(ConfigError, match="unknown method 'nope': expected one of gpipe"):
        get_method("nope")
    with pytest.raises(ConfigError, match="unknown method"):
        resolve("nope", 2)
    with pytest.raises(ConfigError, match="unknown schedule 'zigzag'"):
        resolve_policy("gpipe", schedule="zigzag")


# -- resolve -------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_resolve_default_microbatches_per_method(method, w):
    r = resolve(method, w, warn=False)
    # pipedream and the remedies built on it (docs/design.md section 12) take whole mini-batches
    want = 1 if method in ("pipedream", "pipedream-lr", "dc-asgd", "gap-aware") else w
    assert r.num_microbatches == default_microbatches(method, w) == want
    assert (r.method, r.num_stages) == (METHODS[method], w)
    assert (r.schedule, r.policy) == resolve_policy(method)
    # an explicit N is kept
    assert resolve(method, w, w + 1, warn=False).num_microbatches == w + 1


def test_resolve_applies_overrides():
    r = resolve("v-timeprest", 3, 3, schedule="2bw", backward="intermediate", decay=0.5)
    assert r.schedule == "2bw"
    assert (r.policy.forward, r.policy.backward) == ("live", "intermediate")
    assert r.policy.significance == Significance("exp", 0.5)


def test_resolve_2bw_needs_at_least_w_microbatches():
    with pytest.raises(ConfigError, match=r"N >= W.*N=3, W=4.*--microbatches 4"):
        resolve("pipedream-2bw", 4, 3)
    with pytest.raises(ConfigError, match="N >= W"):
        resolve("v-timeprest", 4, 2, schedule="2bw")
    assert resolve("pipedream-2bw", 4, 4).num_microbatches == 4


def test_resolve_previous_needs_2bw():
    with pytest.raises(ConfigError, match="forward rule 'previous' needs the 2bw schedule"):
        resolve("pipedream-2bw", 3, 3, schedule="nf1b")
    with pytest.raises(ConfigError, match="'previous' needs the 2bw"):
        resolve("v-timeprest", 3, 3, forward="previous")
    assert resolve("v-timeprest", 3, 3, schedule="2bw", forward="previous").schedule == "2bw"


@pytest.mark.parametrize(("w", "n"), [(0, 1), (-1, 1), (2, 0), (2, -3)])
def test_resolve_rejects_bad_sizes(w, n):
    with pytest.raises(ConfigError, match="integer >= 1"):
        resolve("gpipe", w, n)


@pytest.mark.parametrize("bad", [2.0, True, "2"])
def test_resolve_rejects_non_integer_sizes(bad):
    with pytest.raises(ConfigError, match="integer >= 1"):
        resolve("gpipe", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="integer >= 1"):
        resolve("gpipe", 2, bad)  # type: ignore[arg-type]


def _library_call(method, w, n):
    """Stands for a library function (Pipeline, simulate) that resolves for its caller."""
    return resolve(method, w, n)


def test_resolve_warns_about_the_multiple_sequence_problem_at_the_callers_line():
    with pytest.warns(MultipleSequenceWarning, match="v-timeprest: nF1B with N=2") as rec:
        line = sys._getframe().f_lineno + 1
        _library_call("v-timeprest", 4, 2)
    # the default stack level names the line that called the library function
    assert (rec[0].filename, rec[0].lineno) == (__file__, line)
    with pytest.warns(MultipleSequenceWarning) as rec:
        line = sys._getframe().f_lineno + 1
        resolve("i-timeprest", 5, 3, stacklevel=2)
    assert (rec[0].filename, rec[0].lineno) == (__file__, line)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve("v-timeprest", 4, 3)  # N = W-1: no chains
        resolve("v-timeprest", 4, 2, warn=False)
        resolve("gpipe", 4, 1)  # only nF1B has the problem


@pytest.mark.parametrize("n", [None, 1, 2])
def test_pipedream_is_exempt_from_the_multiple_sequence_warning(n):
    # whole mini-batches (N = 1) are PipeDream's own design, and its schedule is nF1B
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = resolve("pipedream", 4, n)
        warn_multiple_sequence("pipedream", "nf1b", 4, 1)
    assert r.schedule == "nf1b"
    # the same schedule and sizes under another method's name do warn
    with pytest.warns(MultipleSequenceWarning, match="timeprest: nF1B with N=1"):
        warn_multiple_sequence("timeprest", "nf1b", 4, 1)
