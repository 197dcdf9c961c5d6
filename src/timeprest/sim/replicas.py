"""The simulator's data-parallel term: the gradient all-reduce of D replicas before each update.

With D replicas (docs/design.md section 10) every copy of stage s combines its
gradient with the other D - 1 before ``U{t}``. The simulator prices that as a
ring all-reduce of the stage's gradient (as many bytes as one weight version):
``2 (D - 1)`` steps, each moving ``bytes / D`` and paying the link latency::

    time = 2 (D - 1) / D * bytes / bandwidth + 2 (D - 1) * latency

The term is added to the stage's update, so in the timeline it sits right
before each ``U``, and the replicas, running the same schedule, stay in step.
Throughput counts D replicas' mini-batches per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from timeprest.errors import ConfigError
from timeprest.sim.costmodel import CostModel
from timeprest.sim.simulate import SimResult


def allreduce_time(num_bytes: int, replicas: int, bandwidth: float | None, latency: float) -> float:
    """Seconds of a ring all-reduce of ``num_bytes`` over ``replicas`` (0 with one replica)."""
    if replicas == 1:
        return 0.0
    steps = 2 * (replicas - 1)
    transfer = 0.0 if bandwidth is None else steps / replicas * num_bytes / bandwidth
    return transfer + steps * latency


@dataclass(frozen=True)
class DataParallel:
    """D replicas and the link their all-reduces use."""

    replicas: int
    bandwidth: float | None  # bytes/s; None is infinitely fast
    latency: float  # seconds per step
    reduce_times: tuple[float, ...]  # per stage, seconds added before each update

    def throughput(self, result: SimResult) -> float:
        """Mini-batches per second of all the replicas together (D times one pipeline's)."""
        return self.replicas * result.throughput


def with_data_parallel(
    cost_model: CostModel,
    replicas: int,
    *,
    bandwidth: float | None = None,
    latency: float | None = None,
) -> tuple[CostModel, DataParallel]:
    """``cost_model`` with each stage's all-reduce added to its update time.

    ``bandwidth`` and ``latency`` default to the cost model's link (measured by
    ``timeprest profile``); the bytes are each stage's ``weight_bytes``.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"--data-parallel must be an integer >= 1, got {replicas!r}")
    bw = cost_model.bandwidth if bandwidth is None else bandwidth
    lat = cost_model.latency if latency is None else latency
    if bw is not None and not (bw > 0 and math.isfinite(bw)):
        raise ConfigError(f"the all-reduce bandwidth must be > 0 bytes/s, got {bw}")
    if not (lat >= 0 and math.isfinite(lat)):
        raise ConfigError(f"the all-reduce latency must be a finite number >= 0, got {lat}")
    times = tuple(allreduce_time(st.weight_bytes, replicas, bw, lat) for st in cost_model.stages)
    stages = tuple(
        replace(st, update_time=st.update_time + t) for st, t in zip(cost_model.stages, times)
    )
    return replace(cost_model, stages=stages), DataParallel(replicas, bw, lat, times)


def format_data_parallel(result: SimResult, dp: DataParallel) -> str:
    """The text lines the simulator adds for D replicas."""
    link = "infinite" if dp.bandwidth is None else f"{dp.bandwidth:.6g} B/s"
    per_stage = ", ".join(f"{t:.6g}" for t in dp.reduce_times)
    return "\n".join(
        [
            f"data parallel: D={dp.replicas} replicas, {dp.replicas * result.num_stages} "
            f"processes; ring all-reduce before each U ({link}, latency {dp.latency:.6g} s "
            f"per step): {per_stage} s per stage",
            f"throughput of the {dp.replicas} replicas {dp.throughput(result):.6g} "
            f"replica mini-batches/s ({dp.replicas} x {result.throughput:.6g}: {dp.replicas} times "
            "the samples)",
        ]
    )
