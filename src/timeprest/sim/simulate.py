"""Replay a method's schedule under a cost model: timeline, bubbles, memory and staleness.

The simulator holds no tensors. It builds the schedule (the list-rule
schedules are ordered by the cost model's times, as the engines would order
them after profiling), replays it with :func:`timeprest.schedule.replay`
(the one readiness function, :func:`timeprest.schedule.deps`, decides when
an action may start), asks :func:`timeprest.policy.plan_versions` which
weight versions each action reads and holds, and derives from both the
numbers of a :class:`SimResult`.

Time per mini-batch is measured in steady state: the mean interval between
successive updates over the middle half of the mini-batches at each stage
(the first and last quarter hold the fill and the drain), the slowest stage
taken. With fewer than two mini-batches there is no interval and the
makespan is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from timeprest.errors import ConfigError
from timeprest.policy import Policy, StagePlan, plan_versions, resolve
from timeprest.schedule import Costs, Schedule, Slot, Timeline, build_schedule, replay
from timeprest.sim.costmodel import CostModel
from timeprest.sim.memory import MemoryTimeline, memory_timelines

OrderCosts = Literal["model", "default", "paper"]
ORDER_COSTS: tuple[str, ...] = ("model", "default", "paper")


@dataclass(frozen=True)
class StageResult:
    """What one stage does over the simulated run."""

    stage: int
    busy_time: float
    idle_time: float
    bubble_fraction: float
    """Idle share of the whole run (fill and drain included)."""
    steady_bubble_fraction: float
    """Idle share of one mini-batch period in steady state."""
    update_interval: float
    """Steady-state time between two updates at this stage."""
    weight_versions: int
    """Peak number of stored weight versions (the transient not counted)."""
    weight_versions_with_transient: int
    peak_memory_bytes: int
    peak_weight_bytes: int
    peak_activation_bytes: int
    peak_received_bytes: int
    optimizer_state_bytes: int
    extra_buffers: int
    """Weight-sized remedy buffers kept between updates (docs/design.md section 12)."""
    staleness: dict[tuple[int, int], int]
    """Degree of staleness ``d = k - v`` of the backward of every micro-batch ``(t, j)``."""
    memory: MemoryTimeline

    @property
    def max_staleness(self) -> int:
        return max(self.staleness.values(), default=0)

    @property
    def mean_staleness(self) -> float:
        vals = list(self.staleness.values())
        return sum(vals) / len(vals) if vals else 0.0


@dataclass(frozen=True)
class SimResult:
    """Everything the simulator predicts for one method, schedule and cost model."""

    method: str
    schedule: Schedule
    policy: Policy
    cost_model: CostModel
    costs: Costs
    timeline: Timeline
    plans: tuple[StagePlan, ...]
    stages: tuple[StageResult, ...]
    time_per_minibatch: float
    """Steady-state time between successive updates (see :func:`steady_state`)."""
    steady: SteadyState
    """How :attr:`time_per_minibatch` was measured (at the slowest stage)."""

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def makespan(self) -> float:
        return self.timeline.makespan

    @property
    def throughput(self) -> float:
        """Mini-batches per second in steady state."""
        return 0.0 if self.time_per_minibatch == 0 else 1.0 / self.time_per_minibatch

    @property
    def bound(self) -> float:
        """The slowest stage's work per mini-batch: ``max_s N (F_s + B_s) + U_s``."""
        n = self.schedule.num_microbatches
        return max(
            n * (c.forward_time + c.backward_time) + c.update_time for c in self.cost_model.stages
        )

    @property
    def bound_ratio(self) -> float:
        """Time per mini-batch over :attr:`bound` (1.0: the slowest stage never waits)."""
        return self.time_per_minibatch / self.bound

    def reads(self, stage: int, index: int) -> tuple[int, ...]:
        """The weight versions action ``index`` of ``stage``'s program reads."""
        return self.plans[stage].reads[index]

    def label(self, stage: int, index: int) -> str:
        """``F3.1 v2``: the action and the weight version(s) it reads (``v1+3``: intermediate)."""
        a = self.schedule.programs[stage][index]
        rd = self.reads(stage, index)
        if a.is_update:
            return str(a)
        return f"{a} v{'+'.join(str(v) for v in rd)}"

    def slots(self) -> list[tuple[Slot, int]]:
        """Every slot with its index in its stage's program."""
        return [(sl, i) for row in self.timeline.stages for i, sl in enumerate(row)]

    def to_json(self, *, include_timeline: bool = True) -> dict[str, Any]:
        st = self.stages
        out: dict[str, Any] = {
            "method": self.method,
            "schedule": self.schedule.kind,
            "policy": {
                "forward": self.policy.forward,
                "backward": self.policy.backward,
                "grad_rule": self.policy.grad_rule,
                "significance": self.policy.significance.describe(),
            },
            "stages": self.num_stages,
            "microbatches": self.schedule.num_microbatches,
            "minibatches": self.schedule.num_minibatches,
            "time_unit": "s",
            "makespan": self.makespan,
            "time_per_minibatch": self.time_per_minibatch,
            "throughput": self.throughput,
            "steady_state": {
                "periodic": self.steady.periodic,
                "period": self.steady.period,
                "first_update": self.steady.first,
                "last_update": self.steady.last,
            },
            "bound": self.bound,
            "bound_ratio": self.bound_ratio,
            "busy_time": [r.busy_time for r in st],
            "idle_time": [r.idle_time for r in st],
            "bubble_fraction": [r.bubble_fraction for r in st],
            "steady_bubble_fraction": [r.steady_bubble_fraction for r in st],
            "update_interval": [r.update_interval for r in st],
            "weight_versions": [r.weight_versions for r in st],
            "weight_versions_with_transient": [r.weight_versions_with_transient for r in st],
            "peak_memory_bytes": [r.peak_memory_bytes for r in st],
            "peak_weight_bytes": [r.peak_weight_bytes for r in st],
            "peak_activation_bytes": [r.peak_activation_bytes for r in st],
            "peak_received_bytes": [r.peak_received_bytes for r in st],
            "optimizer_state_bytes": [r.optimizer_state_bytes for r in st],
            "extra_buffers": [r.extra_buffers for r in st],
            "max_staleness": [r.max_staleness for r in st],
            "mean_staleness": [r.mean_staleness for r in st],
            "staleness": [[[t, j, d] for (t, j), d in sorted(r.staleness.items())] for r in st],
            "cost_model": self.cost_model.to_json(),
        }
        if include_timeline:
            out["slots"] = [
                {
                    "stage": sl.stage,
                    "action": str(sl.action),
                    "start": sl.start,
                    "end": sl.end,
                    "reads": list(self.reads(sl.stage, i)),
                }
                for sl, i in self.slots()
            ]
            out["memory"] = [
                {
                    "times": list(r.memory.times),
                    "total": list(r.memory.total),
                    "weights": list(r.memory.weights),
                    "transient": list(r.memory.transient),
                    "activations": list(r.memory.activations),
                    "workspace": list(r.memory.workspace),
                    "received": list(r.memory.received),
                    "optimizer": r.memory.optimizer,
                }
                for r in st
            ]
        return out


@dataclass(frozen=True)
class SteadyState:
    """How the time per mini-batch was measured at one stage."""

    interval: float
    """Mean time between successive updates over the measured updates."""
    first: int
    """The first and last update (mini-batch index) of the measurement."""
    last: int
    period: int
    """Mini-batches after which the update intervals repeat; 0 if no repetition was found."""

    @property
    def periodic(self) -> bool:
        return self.period > 0


def steady_state(ends: Sequence[float], rel_tol: float = 1e-9) -> SteadyState:
    """Measure the steady-state interval between updates from their end times.

    The first and last quarter of the updates hold the fill and the drain and
    are left out. With unbalanced stages the list rule settles into a pattern
    that repeats every few mini-batches (intervals such as 12, 25, 12, 25), so
    the mean is taken over a whole number of repetitions of the shortest
    period found in the middle half; without a repetition (too few
    mini-batches) the mean over the middle half is returned with period 0.
    """
    t_count = len(ends)
    if t_count < 2:
        return SteadyState(ends[-1] if ends else 0.0, 0, max(t_count - 1, 0), 0)
    a = t_count // 4
    b = t_count - 1 - t_count // 4
    if b <= a:
        a, b = 0, t_count - 1
    gaps = [ends[i + 1] - ends[i] for i in range(a, b)]
    scale = max(abs(g) for g in gaps) or 1.0
    for p in range(1, len(gaps) // 2 + 1):
        if all(abs(gaps[i] - gaps[i - p]) <= rel_tol * scale for i in range(p, len(gaps))):
            k = (len(gaps) // p) * p
            return SteadyState((ends[a + k] - ends[a]) / k, a, a + k, p)
    return SteadyState((ends[b] - ends[a]) / (b - a), a, b, 0)


def update_ends(timeline: Timeline, stage: int) -> list[float]:
    """End time of every ``U`` at ``stage``, in mini-batch order."""
    ups = sorted(
        (sl.action.minibatch, sl.end) for sl in timeline.stages[stage] if sl.action.is_update
    )
    return [e for _, e in ups]


def simulate_schedule(
    schedule: Schedule,
    policy: Policy,
    cost_model: CostModel,
    *,
    method: str = "custom",
) -> SimResult:
    """Replay ``schedule`` under ``cost_model`` and derive bubbles, memory and staleness."""
    w, n = schedule.num_stages, schedule.num_microbatches
    if cost_model.num_stages != w:
        raise ConfigError(
            f"the cost model describes {cost_model.num_stages} stages but the schedule has {w}"
        )
    costs = cost_model.to_costs()
    timeline = replay(schedule.programs, costs, n, schedule.backward_unit)
    plans = tuple(plan_versions(schedule, policy))
    mem = memory_timelines(timeline, plans, cost_model, costs, n, policy.grad_rule)

    steady = [steady_state(update_ends(timeline, s)) for s in range(w)]
    intervals = [st.interval for st in steady]
    # every stage makes one update per mini-batch, so in steady state the
    # intervals agree; the slowest one is the pipeline's pace
    period = max(intervals)
    slowest = steady[intervals.index(period)]

    span = timeline.makespan
    stages: list[StageResult] = []
    for s in range(w):
        c = cost_model.stages[s]
        busy = timeline.busy_time(s)
        work = n * (c.forward_time + c.backward_time) + c.update_time
        plan = plans[s]
        stages.append(
            StageResult(
                stage=s,
                busy_time=busy,
                idle_time=span - busy,
                bubble_fraction=timeline.bubble_fraction(s),
                steady_bubble_fraction=max(0.0, 1.0 - work / period) if period > 0 else 0.0,
                update_interval=intervals[s],
                weight_versions=plan.peak_versions,
                weight_versions_with_transient=plan.peak_with_transient,
                peak_memory_bytes=mem[s].peak,
                peak_weight_bytes=mem[s].peak_weight_bytes,
                peak_activation_bytes=mem[s].peak_activation_bytes,
                peak_received_bytes=mem[s].peak_received_bytes,
                optimizer_state_bytes=c.optimizer_state_bytes,
                extra_buffers=plan.extra_buffers,
                staleness={key: plan.staleness(*key) for key in sorted(plan.backward_version)},
                memory=mem[s],
            )
        )
    return SimResult(
        method=method,
        schedule=schedule,
        policy=policy,
        cost_model=cost_model,
        costs=costs,
        timeline=timeline,
        plans=plans,
        stages=tuple(stages),
        time_per_minibatch=period,
        steady=slowest,
    )


def simulate(
    method: str,
    num_stages: int,
    num_microbatches: int | None = None,
    num_minibatches: int = 32,
    cost_model: CostModel | None = None,
    *,
    schedule: str | None = None,
    policy: Policy | None = None,
    order_costs: OrderCosts = "model",
) -> SimResult:
    """Simulate ``method`` on ``num_stages`` stages.

    (method, W, N, schedule) resolve through :func:`timeprest.policy.resolve`,
    like every other command, so ``num_microbatches=None`` is the same N that
    ``timeprest train`` runs (1 for pipedream, else W) and the same
    constraints are checked. ``cost_model`` defaults to uniform unit costs
    (forward 1, backward 2, no communication, no memory sizes).
    ``schedule`` and ``policy`` override the method's (a ``policy`` is checked
    against the schedule as its rules would be when given one by one).
    ``order_costs`` picks the costs that order the list-rule schedules
    (``model``: the cost model's own times; ``default`` or ``paper``: the
    schedule package's modes, then replayed under the cost model, which shows
    what a badly ordered schedule costs).
    """
    overrides: dict[str, Any] = {}
    if policy is not None:  # every part of it, the remedies' too (docs/design.md section 12)
        c = policy.correction
        overrides = {
            "forward": policy.forward,
            "backward": policy.backward,
            "grad_rule": policy.grad_rule,
            "significance": policy.significance,
            "gamma": policy.velocity.gamma,
            "correction": c.kind,
            "dc_lambda": c.dc_lambda,
            "gap_beta": c.gap_beta,
            "gap_eps": c.gap_eps,
            "lr_rule": policy.lr_rule.kind,
            "pipemare_warmup": policy.lr_rule.warmup,
        }
    res = resolve(method, num_stages, num_microbatches, schedule=schedule, **overrides)
    cm = CostModel.uniform(num_stages) if cost_model is None else cost_model
    if cm.num_stages != num_stages:
        raise ConfigError(
            f"the cost model describes {cm.num_stages} stages but {num_stages} were asked for"
        )
    if order_costs not in ORDER_COSTS:
        raise ConfigError(
            f"unknown order costs {order_costs!r}: expected one of {', '.join(ORDER_COSTS)}"
        )
    order: Costs | str = cm.to_costs() if order_costs == "model" else order_costs
    sched = build_schedule(
        res.schedule, num_stages, res.num_microbatches, num_minibatches, order, warn=False
    )
    return simulate_schedule(sched, res.policy, cm, method=method)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # not reached


def format_text(result: SimResult) -> str:
    """A human summary: timing, then one line per stage."""
    r = result
    sc = r.schedule
    lines = [
        f"{r.method}: schedule {sc.kind}, W={sc.num_stages}, N={sc.num_microbatches}, "
        f"T={sc.num_minibatches}; policy forward={r.policy.forward} backward={r.policy.backward}",
        f"makespan {r.makespan:.6g} s; time per mini-batch {r.time_per_minibatch:.6g} s "
        + (
            f"(steady state, updates {r.steady.first}..{r.steady.last}, "
            f"period {r.steady.period} mini-batch{'es' if r.steady.period > 1 else ''})"
            if r.steady.periodic
            else f"(NOT steady: no repeating pattern in updates {r.steady.first}.."
            f"{r.steady.last}; raise --minibatches)"
        ),
        f"throughput {r.throughput:.6g} mini-batches/s; slowest-stage bound "
        f"max_s N(F+B)+U = {r.bound:.6g} s, ratio {r.bound_ratio:.3f}",
        "",
    ]
    header = (
        f"{'stage':>5} {'busy s':>10} {'bubble':>7} {'steady':>7} {'versions':>8} "
        f"{'max d':>5} {'mean d':>6} {'peak memory':>12} {'weights':>11} {'activations':>11}"
    )
    lines.append(header)
    for s in r.stages:
        vers = str(s.weight_versions)
        if s.weight_versions_with_transient > s.weight_versions:
            vers += "+1"
        if s.extra_buffers:  # remedy buffers (docs/design.md section 12)
            vers += f"+{s.extra_buffers}b"
        lines.append(
            f"{s.stage:>5} {s.busy_time:>10.6g} {s.bubble_fraction:>7.3f} "
            f"{s.steady_bubble_fraction:>7.3f} {vers:>8} {s.max_staleness:>5} "
            f"{s.mean_staleness:>6.2f} {format_bytes(s.peak_memory_bytes):>12} "
            f"{format_bytes(s.peak_weight_bytes):>11} {format_bytes(s.peak_activation_bytes):>11}"
        )
    if all(s.peak_memory_bytes == 0 for s in r.stages):
        lines.append(
            "(no memory sizes given: use --cost-file FILE from `timeprest profile`, or "
            "--weight-bytes/--activation-bytes)"
        )
    return "\n".join(lines)
