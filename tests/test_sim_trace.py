"""sim/trace.py: the Chrome trace of a simulated run."""

from __future__ import annotations

import json

from sim_cases import sim, sized
from timeprest.sim import chrome_trace, write_chrome_trace


def test_chrome_trace_structure():
    r = sim("pipedream", 3, 1, 6, sized(3))
    tr = json.loads(json.dumps(chrome_trace(r)))
    ev = tr["traceEvents"]
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"stage 0", "stage 1", "stage 2"}
    spans = [e for e in ev if e["ph"] == "X"]
    assert len(spans) == sum(1 for p in r.schedule.programs for a in p if not a.is_update)
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in spans)
    instants = [e for e in ev if e["ph"] == "i"]
    assert len(instants) == 3 * 6  # the zero-time updates
    counters = [e for e in ev if e["ph"] == "C"]
    assert {e["name"] for e in counters} == {f"memory stage {s} (bytes)" for s in range(3)}
    b = next(e for e in spans if e["args"]["action"] == "B5" and e["tid"] == 0)
    assert b["args"]["staleness"] == [2] and b["name"] == "B5 v3"


def test_trace_counters_are_the_memory_timeline_in_microseconds(tmp_path):
    r = sim("gpipe", 2, 2, 2, sized(2))
    tr = chrome_trace(r)
    m = r.stages[1].memory
    counters = [e for e in tr["traceEvents"] if e["name"] == "memory stage 1 (bytes)"]
    assert [e["ts"] for e in counters] == [t * 1e6 for t in m.times]
    assert [sum(e["args"].values()) for e in counters] == list(m.total)
    assert tr["otherData"]["time_per_minibatch_s"] == r.time_per_minibatch
    out = tmp_path / "trace.json"
    write_chrome_trace(r, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(tr))
