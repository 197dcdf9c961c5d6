"""What a stage's actions cost, from the times a run recorded (``StageRunner.action_times``).

Every action run while ``runner.action_times`` is a list is recorded there as
``(kind, mini-batch, micro-batches, seconds, waiting)``: *waiting* is the part
of it its receives spent waiting for a message still on its way
(``Transport.waited``). The emulator's profile
(:func:`timeprest.sim.profile.profile_stages`) and
:meth:`timeprest.Pipeline.time_actions` both read them here.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from timeprest.errors import ConfigError

ActionTime = tuple[str, int, int, float, float]
Costs = tuple[float, float, float]


def action_costs(action_times: Sequence[ActionTime], skip: int = 0) -> Costs:
    """One stage's (forward, backward per micro-batch, update) seconds from the actions a
    run timed (``StageRunner.action_times``), the mini-batches numbered below ``skip``
    left out (the numbers the entries hold: the pipeline's count, which goes on from one
    ``train()`` call to the next).

    An action counts without its waiting for messages on their way (a
    receive's own work, a send and the Python around them stay in it), so
    the times of a distributed run (every rank's own runner) give a cost model
    of that run's actions: simulate it with the link's latency and bandwidth
    and no per-message overhead, which these times hold already. Per
    mini-batch, the mean time of its actions (a backward over several
    micro-batches counts per micro-batch), then the median over mini-batches:
    a cost every mini-batch pays (its first forward cuts it into
    micro-batches) counts, a one-off stall (the allocator growing the heap)
    does not.
    """
    per: dict[int, dict[str, list[float]]] = {}
    for kind, t, count, sec, waited in action_times:
        if t >= skip:
            sums = per.setdefault(t, {}).setdefault(kind, [0.0, 0.0])
            sums[0] += sec - waited
            sums[1] += count
    if not per or not all("F" in m and "B" in m for m in per.values()):
        raise ConfigError(
            f"no mini-batch from {skip} on has both its forward and its backward timed: "
            "time a longer run, or skip fewer mini-batches"
        )
    f, b, u = (_median_of_means(per, kind) for kind in "FBU")
    return max(f, 1e-9), max(b, 1e-9), u


def _median_of_means(per: dict[int, dict[str, list[float]]], kind: str) -> float:
    """The median over mini-batches of ``kind``'s seconds per action (per micro-batch)."""
    means = [m[kind][0] / m[kind][1] for m in per.values() if kind in m]
    return statistics.median(means) if means else 0.0
