"""Each rank's message plan, read off the lowered programs (pure: no processes)."""

from __future__ import annotations

import pytest

from timeprest.engine.runtime import plan_messages, stage_events
from timeprest.schedule import build_schedule


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "nf1b", "2bw"])
def test_message_plans_pair_up(kind: str) -> None:
    """What stage s sends is what s+1 receives, in the same order; every send is released."""
    w, n, t = 4, 4, 5
    sched = build_schedule(kind, w, n, t)
    plans = [plan_messages(sched, s) for s in range(w)]
    for s in range(w - 1):
        assert plans[s].send["act"] == plans[s + 1].recv["act"]
        assert plans[s + 1].send["grad"] == plans[s].recv["grad"]
        assert len(plans[s].send["act"]) == n * t
    for s in range(w):
        released = [k for keys in plans[s].release.values() for k in keys]
        assert len(released) == len(set(released))
        events = stage_events(sched, s)
        assert sum(1 for e in events if e[0] == "send") >= len(released)
