"""The memory model: bytes each stage holds over time, from a timeline and the version plan.

No second replay: the times come from :func:`timeprest.schedule.replay`
(the slots), and which weight versions exist when comes from
:func:`timeprest.policy.plan_versions`. What a stage holds at time τ:

- **weights**: one ``weight_bytes`` per stored version. Version 0 exists from
  the start; version ``v+1`` appears when the ``U`` that makes it starts.
  An update without a stash turns ``v`` into ``v+1`` in place (no new
  bytes); an update that stashes copies ``v`` first, and the copy is freed
  when its last reader (the plan's ``keep_until``) ends.
- **transient**: one more ``weight_bytes`` while an action that builds a
  weight-sized tensor runs (the plan's ``transient``): a backward on an
  intermediate or extrapolated weight, a predicted forward (docs/design.md
  section 12).
- **activations**: per in-flight micro-batch, ``saved_activation_bytes``
  (rule ``graph``) or the stage input (rule ``recompute``), from the start
  of its forward to the end of the backward that covers it.
- **workspace**: under ``recompute``, one micro-batch's saved activations
  while a backward recomputes its forward.
- **received**: a forward input from the start of its arrival (end of the
  sender's forward plus the message time) until the forward that reads it
  starts; a gradient from its arrival until the backward that reads it
  ends.
- **optimizer**: ``optimizer_state_bytes``, all the time.
- **buffers**: the plan's ``extra_buffers`` (a velocity, a running average of
  steps) times ``weight_bytes``, all the time.

Frees at an instant are applied before allocations at that instant, so the
value on ``[times[i], times[i+1])`` is what the stage holds in between.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from timeprest.policy import StagePlan
from timeprest.policy.rules import GradRule
from timeprest.schedule import Action, Costs, Slot, Timeline
from timeprest.sim.costmodel import CostModel

COMPONENTS = ("weights", "transient", "activations", "workspace", "received")


@dataclass(frozen=True)
class MemoryTimeline:
    """Bytes held by one stage as a step function of time.

    Entry ``i`` of every series holds on ``[times[i], times[i+1])``; the last
    entry is the state at the end of the run.
    """

    stage: int
    times: tuple[float, ...]
    weights: tuple[int, ...]
    """Stored weight versions times ``weight_bytes``."""
    transient: tuple[int, ...]
    """An intermediate weight built for a backward (I-TiMePReSt)."""
    activations: tuple[int, ...]
    """Saved for the backward of in-flight micro-batches."""
    workspace: tuple[int, ...]
    """Recomputed activations of the micro-batch being backpropagated (``recompute``)."""
    received: tuple[int, ...]
    """Messages (activations or gradients) received and not yet consumed."""
    versions: tuple[int, ...]
    """Number of stored weight versions."""
    optimizer: int
    """Optimizer state, constant."""
    buffers: int = 0
    """Weight-sized remedy buffers kept between updates, constant."""

    @property
    def total(self) -> tuple[int, ...]:
        return tuple(
            w + x + a + k + r + self.optimizer + self.buffers
            for w, x, a, k, r in zip(
                self.weights, self.transient, self.activations, self.workspace, self.received
            )
        )

    @property
    def peak(self) -> int:
        return max(self.total, default=self.optimizer + self.buffers)

    @property
    def peak_weight_bytes(self) -> int:
        """Stored versions plus a transient intermediate weight, at their highest."""
        return max((w + x for w, x in zip(self.weights, self.transient)), default=0)

    @property
    def peak_versions(self) -> int:
        return max(self.versions, default=1)

    @property
    def peak_activation_bytes(self) -> int:
        return max(self.activations, default=0)

    @property
    def peak_received_bytes(self) -> int:
        return max(self.received, default=0)


def memory_timelines(
    timeline: Timeline,
    plans: Sequence[StagePlan],
    cost_model: CostModel,
    costs: Costs,
    num_microbatches: int,
    grad_rule: GradRule = "graph",
) -> list[MemoryTimeline]:
    """The memory of every stage over the run (see the module docstring for the model)."""
    w = timeline.num_stages
    n = num_microbatches
    slot_of: list[dict[Action, Slot]] = [{sl.action: sl for sl in row} for row in timeline.stages]
    end = timeline.makespan
    out: list[MemoryTimeline] = []
    for s in range(w):
        c = cost_model.stages[s]
        plan = plans[s]
        row = timeline.stages[s]
        # (time, order, component, delta): order 0 frees, 1 allocates
        ev: list[tuple[float, int, str, int]] = []

        def add(
            t0: float, t1: float, comp: str, size: int, ev: list[tuple[float, int, str, int]] = ev
        ) -> None:
            if size == 0 or t1 <= t0:
                return
            ev.append((t0, 1, comp, size))
            if t1 < math.inf:
                ev.append((t1, 0, comp, -size))

        # weight versions: born at 0 or at the start of the U that makes them
        u_index = [i for i, sl in enumerate(row) if sl.action.kind == "U"]
        for v, keep in plan.keep_until.items():
            born = 0.0 if v == 0 else row[u_index[v - 1]].start
            replaced = u_index[v] if v < len(u_index) else None
            if replaced is None:  # the final latest version stays
                gone = math.inf
            elif replaced not in plan.stash_at:
                gone = row[replaced].start  # updated in place: the bytes become v+1
            else:
                gone = row[keep].end  # a stashed copy, freed after its last reader
            add(born, gone, "versions", 1)
        # transient weights, workspace and received gradients
        for i, sl in enumerate(row):
            if plan.transient[i]:
                add(sl.start, sl.end, "transient", c.weight_bytes)
            if not sl.action.is_backward:
                continue
            mbs = sl.action.microbatches(n)
            if grad_rule == "recompute":
                add(sl.start, sl.end, "workspace", c.saved_activation_bytes)
            if s < w - 1:
                sender = slot_of[s + 1][sl.action]
                arrive = sender.end + costs.comm_delay(s + 1, s)
                add(arrive, sl.end, "received", len(mbs) * c.output_bytes)
        # saved activations and received forward inputs, per micro-batch
        backward_of: dict[tuple[int, int], Slot] = {}
        for sl in row:
            if sl.action.is_backward:
                for j in sl.action.microbatches(n):
                    backward_of[(sl.action.minibatch, j)] = sl
        saved = c.saved_activation_bytes if grad_rule == "graph" else cost_model.input_bytes_of(s)
        for sl in row:
            if not sl.action.is_forward:
                continue
            key = (sl.action.minibatch, sl.action.microbatch or 0)
            add(sl.start, backward_of[key].end, "activations", saved)
            if s > 0:
                sender = slot_of[s - 1][sl.action]
                arrive = sender.end + costs.comm_delay(s - 1, s)
                add(arrive, sl.start, "received", cost_model.input_bytes_of(s))
        mt = _sweep(s, ev, c.weight_bytes, c.optimizer_state_bytes, end)
        out.append(replace(mt, buffers=plan.extra_buffers * c.weight_bytes))
    return out


def _sweep(
    stage: int,
    events: list[tuple[float, int, str, int]],
    weight_bytes: int,
    optimizer: int,
    end: float,
) -> MemoryTimeline:
    """Turn allocation/free events into step series (frees first at equal times)."""
    events.sort(key=lambda e: (e[0], e[1]))
    level: dict[str, int] = defaultdict(int)
    times: list[float] = []
    series: dict[str, list[int]] = {k: [] for k in (*COMPONENTS, "versions")}
    i = 0
    while i < len(events):
        t = events[i][0]
        while i < len(events) and events[i][0] == t:
            level[events[i][2]] += events[i][3]
            i += 1
        times.append(t)
        for k in series:
            series[k].append(level[k])
    if not times or times[0] > 0.0:
        times.insert(0, 0.0)
        for k in series:
            series[k].insert(0, 0)
    if times[-1] < end:
        times.append(end)
        for k in series:
            series[k].append(series[k][-1])
    for k in series:
        assert min(series[k]) >= 0, f"memory model: negative {k} at stage {stage}"
    versions = tuple(series["versions"])
    return MemoryTimeline(
        stage=stage,
        times=tuple(times),
        weights=tuple(v * weight_bytes for v in versions),
        transient=tuple(series["transient"]),
        activations=tuple(series["activations"]),
        workspace=tuple(series["workspace"]),
        received=tuple(series["received"]),
        versions=versions,
        optimizer=optimizer,
    )
