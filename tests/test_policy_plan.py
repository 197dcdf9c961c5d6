"""policy/plan.py: the version plan of every action, over integers."""

from __future__ import annotations

import warnings

import pytest

from timeprest.errors import MultipleSequenceWarning, ScheduleError
from timeprest.policy import Policy, plan_versions, resolve_policy
from timeprest.schedule import build_schedule


def plans(method, w, n, t=12, **kw):
    kind, pol = resolve_policy(method, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        return plan_versions(build_schedule(kind, w, n, t), pol)


def _peaks(method, w, n):
    ps = plans(method, w, n)
    return [p.peak_versions for p in ps], [p.peak_with_transient for p in ps]


@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
def test_version_counts_per_stage(w):
    # the closed forms of docs/design.md section 6, for N = W and N = max(W, 2)
    for n in sorted({w, max(w, 2)}):
        for m in ("gpipe", "1f1b", "v-timeprest"):
            assert _peaks(m, w, n) == ([1] * w, [1] * w), m
        if w > 1:
            assert _peaks("pipedream-2bw", w, n)[0] == [2] * w
        versions, with_transient = _peaks("i-timeprest", w, n)
        assert versions == [w - s for s in range(w)]
        assert with_transient == [w - s + 1 for s in range(w - 1)] + [1]
        tp = plans("timeprest", w, n)
        assert tp[0].peak_versions == 1 and all(p.peak_versions > 1 for p in tp[1:])
    assert _peaks("pipedream", w, 1)[0] == [w - s for s in range(w)]


def test_first_backward_is_the_programs_first_per_minibatch():
    """GPipe backpropagates a mini-batch's micro-batches last first; the others from 0."""
    for method, first in (("gpipe", 3), ("1f1b", 0), ("v-timeprest", 0), ("pipedream-2bw", 0)):
        for p in plans(method, 3, 4, t=5):
            assert p.first_backward == {t: first for t in range(5)}, method
    assert all(p.first_backward == {t: 0 for t in range(5)} for p in plans("pipedream", 3, 1, 5))


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


def test_stashed_copies_are_kept_until_their_last_reader():
    # PipeDream at W = 2, N = 1: stage 0 runs F0 F1 B0 U0 F2 B1 U1 ...; B1 reads version 0
    # after U0 has made version 1, so U0 stashes version 0 and it lives until B1
    (p0, p1) = plans("pipedream", 2, 1, t=4)
    prog = [str(a) for a in build_schedule("nf1b", 2, 1, 4, warn=False).programs[0]]
    assert prog[:7] == ["F0.0", "F1.0", "B0", "U0", "F2.0", "B1", "U1"]
    assert 3 in p0.stash_at and p0.keep_until[0] == prog.index("B1")
    assert p0.reads[prog.index("B1")] == (0,) and p0.staleness(1, 0) == 1
    assert p0.held[prog.index("F2.0")] == 2  # the stashed version 0 and the latest 1
    assert p1.stash_at == frozenset() and p1.peak_versions == 1


def test_previous_without_its_double_buffer_is_a_schedule_error():
    sched = build_schedule("nf1b", 3, 2, 4, warn=False)
    with pytest.raises(ScheduleError, match="forward rule 'previous' needs version"):
        plan_versions(sched, Policy("previous", "stashed"))


def test_which_backwards_read_the_tensors_their_forward_read():
    """A stashed backward reads its forward's own version; a latest one the live tensors
    as updated, unless a stash moved them (a plan with stashes); a blend never."""

    def verdicts(method):
        kind, policy = resolve_policy(method)
        plans = plan_versions(build_schedule(kind, 3, 3, 6), policy)
        return {
            (p.stage, d > 0): p.backward_reads_forward_tensors(t, j, policy)
            for p in plans
            for (t, j), d in ((key, p.staleness(*key)) for key in p.forward_version)
        }

    assert set(verdicts("pipedream").values()) == {True}
    assert set(verdicts("v-timeprest").values()) == {True}
    assert verdicts("i-timeprest")[(0, True)] is False  # stale micro-batches read a blend
    assert verdicts("i-timeprest")[(2, False)] is True  # d = 0 at the last stage
    # latest backwards in a plan with stashes (the correction keeps v): not the live tensors
    kind, policy = resolve_policy("v-timeprest", correction="dc")
    plans = plan_versions(build_schedule(kind, 3, 3, 6), policy)
    assert plans[0].stash_at
    stale = [k for k in plans[0].forward_version if plans[0].staleness(*k) > 0]
    assert not any(plans[0].backward_reads_forward_tensors(t, j, policy) for t, j in stale)


@pytest.mark.parametrize("method", ["gpipe", "pipedream", "pipedream-2bw", "i-timeprest"])
@pytest.mark.parametrize(("w", "n"), [(2, 1), (3, 3), (4, 2)])
def test_held_counts_every_version_alive_at_each_index(method, w, n):
    # held[i] is counted by one sweep over the versions' lifetimes; here it is counted
    # directly from when each version is born (the update that makes it) and kept until
    if method == "pipedream-2bw" and n < w:
        n = w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        programs = build_schedule(resolve_policy(method)[0], w, n, 9).programs
    for p, prog in zip(plans(method, w, n, t=9), programs):
        updates = [i for i, a in enumerate(prog) if a.kind == "U"]
        born = {0: 0, **{v + 1: i for v, i in enumerate(updates)}}
        direct = [
            sum(1 for v, until in p.keep_until.items() if born[v] <= i <= until)
            for i in range(len(prog))
        ]
        assert list(p.held) == direct
        assert max(direct) == p.peak_versions
