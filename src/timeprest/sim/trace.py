"""Chrome trace export of a simulated run (open it in https://ui.perfetto.dev or chrome://tracing).

One process, one thread per stage; every action is a complete event named
like the Gantt boxes (``F3.1 v2``) with its versions and staleness in
``args``; zero-time updates are instant events; each stage's memory is a
counter track with one series per component.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from timeprest.sim.simulate import SimResult

_US = 1e6  # trace timestamps are microseconds; simulated times are seconds
_CATEGORY = {"F": "forward", "B": "backward", "U": "update"}


def chrome_trace(result: SimResult) -> dict[str, Any]:
    """The trace as a JSON-ready dict (Trace Event Format, ``traceEvents`` form)."""
    pid = 0
    events: list[dict[str, Any]] = [
        {
            "ph": "M",
            "pid": pid,
            "name": "process_name",
            "args": {"name": f"{result.method} (simulated, W={result.num_stages})"},
        }
    ]
    for s in range(result.num_stages):
        events.append(
            {"ph": "M", "pid": pid, "tid": s, "name": "thread_name", "args": {"name": f"stage {s}"}}
        )
        events.append(
            {
                "ph": "M",
                "pid": pid,
                "tid": s,
                "name": "thread_sort_index",
                "args": {"sort_index": s},
            }
        )
    for sl, i in result.slots():
        a = sl.action
        args: dict[str, Any] = {"action": str(a), "reads": list(result.reads(sl.stage, i))}
        if a.is_backward:
            st = result.stages[sl.stage].staleness
            args["staleness"] = [
                st[(a.minibatch, j)] for j in a.microbatches(result.schedule.num_microbatches)
            ]
        ev: dict[str, Any] = {
            "name": result.label(sl.stage, i),
            "cat": _CATEGORY[a.kind],
            "pid": pid,
            "tid": sl.stage,
            "ts": sl.start * _US,
            "args": args,
        }
        if sl.end > sl.start:
            ev.update(ph="X", dur=(sl.end - sl.start) * _US)
        else:
            ev.update(ph="i", s="t")
        events.append(ev)
    for r in result.stages:
        m = r.memory
        for k, t in enumerate(m.times):
            events.append(
                {
                    "ph": "C",
                    "pid": pid,
                    "name": f"memory stage {r.stage} (bytes)",
                    "ts": t * _US,
                    "args": {
                        "weights": m.weights[k],
                        "transient": m.transient[k],
                        "activations": m.activations[k],
                        "workspace": m.workspace[k],
                        "received": m.received[k],
                        "optimizer": m.optimizer,
                    },
                }
            )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "method": result.method,
            "schedule": result.schedule.kind,
            "num_stages": result.num_stages,
            "num_microbatches": result.schedule.num_microbatches,
            "num_minibatches": result.schedule.num_minibatches,
            "time_per_minibatch_s": result.time_per_minibatch,
        },
    }


def write_chrome_trace(result: SimResult, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(chrome_trace(result)))
