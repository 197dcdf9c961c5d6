"""The version plan: for every action of every stage, which weight versions it reads.

Everything a policy decides follows from the per-stage program order alone
(version ``k_s`` is the number of ``U`` before an action in stage s's program;
``vertical`` also looks at stage 0's program), so the plan is computed before
training, over integers. The engines use it to know when a version may be
released; the simulator uses it to predict weight memory.

Versions here count from the start of the schedule (the engine adds the
number of updates applied before it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from timeprest.errors import ScheduleError
from timeprest.policy.rules import Policy
from timeprest.schedule.builders import Schedule

Key = tuple[int, int]  # (minibatch, microbatch)


@dataclass(frozen=True)
class StagePlan:
    """Version facts of one stage's program.

    ``forward_version[(t, j)]``: the version ``F{t}.{j}`` reads.
    ``backward_version[(t, j)]``: ``k``, the latest version when micro-batch
    ``(t, j)`` is backpropagated (its staleness is ``k - v``).
    ``reads[i]``: versions action ``i`` of the program reads.
    ``keep_until[v]``: the last program index during which version ``v`` is
    held (as the latest or as a stashed copy).
    ``stash_at``: program indices of the ``U`` before which the current
    latest version must be copied, because a later action still reads it.
    ``held[i]``: versions held while action ``i`` runs (a ``U`` that stashes
    counts the copy and the new version); ``transient[i]``: 1 when action
    ``i`` builds a weight-sized tensor that lives only while it runs (an
    intermediate or extrapolated backward weight, a predicted forward weight).
    ``extra_buffers``: weight-sized tensors kept between updates beside the
    versions (docs/design.md section 12).
    ``first_backward[t]``: the micro-batch of mini-batch ``t`` backpropagated
    first in the program (GPipe's order runs the last one first), the one
    whose backward writes the gradients the others add to.
    """

    stage: int
    forward_version: dict[Key, int]
    backward_version: dict[Key, int]
    reads: tuple[tuple[int, ...], ...]
    keep_until: dict[int, int]
    stash_at: frozenset[int]
    held: tuple[int, ...]
    transient: tuple[int, ...]
    extra_buffers: int = 0
    first_backward: dict[int, int] = field(default_factory=dict)

    @property
    def peak_versions(self) -> int:
        return max(self.held, default=1)

    @property
    def peak_with_transient(self) -> int:
        return max((h + x for h, x in zip(self.held, self.transient)), default=1)

    def staleness(self, t: int, j: int) -> int:
        return self.backward_version[(t, j)] - self.forward_version[(t, j)]

    def backward_reads_forward_tensors(self, t: int, j: int, policy: Policy) -> bool:
        """Whether the backward of ``(t, j)`` reads the tensors a forward of the live version
        read, as they are then, so that autograd may keep them (docs/design.md section 5).

        True when it reads that same version (a stash keeps the version's own tensors
        and moves the parameters to a copy), or the latest version unchanged (no blend
        or extrapolation) in a plan without stashes, so that the live tensors are still
        the parameters' and the updates bring them to ``k``.
        """
        k = self.backward_version[(t, j)]
        d = k - self.forward_version[(t, j)]
        reads = policy.weight_reads(k - d, k)
        if reads == (k - d,):
            return True
        return reads == (k,) and policy.velocity_scale(d) == 0.0 and not self.stash_at

    def mean_staleness(self, t: int, num_microbatches: int) -> float:
        """Mean d over the micro-batches of mini-batch t (PipeMare's tau at this stage)."""
        ds = [self.staleness(t, j) for j in range(num_microbatches)]
        return sum(ds) / len(ds)


def plan_versions(schedule: Schedule, policy: Policy) -> list[StagePlan]:
    """Compute the version plan of every stage (raises ScheduleError if a version cannot exist)."""
    n = schedule.num_microbatches
    first: dict[Key, int] = {}
    plans: list[StagePlan] = []
    for s, prog in enumerate(schedule.programs):
        k = 0
        fwd: dict[Key, int] = {}
        bwd: dict[Key, int] = {}
        first_bwd: dict[int, int] = {}
        reads: list[tuple[int, ...]] = []
        transient: list[int] = []
        for a in prog:
            if a.kind == "U":
                reads.append(())
                transient.append(0)
                k += 1
                continue
            if a.kind == "F":
                key = (a.minibatch, a.microbatch or 0)
                if policy.forward in ("live", "predicted"):
                    v = k
                elif policy.forward == "vertical":
                    v = first[key] if s > 0 else k
                    assert v <= k, "vertical sync: stage 0 ran ahead of a later stage's updates"
                else:  # previous
                    v = max(0, a.minibatch - 1)
                    if v > k:
                        raise ScheduleError(
                            f"forward rule 'previous' needs version {v} at stage {s} for {a}, "
                            f"but only {k} updates have been applied there; "
                            "use the 2bw schedule with N >= W"
                        )
                if s == 0:
                    first[key] = v
                fwd[key] = v
                reads.append((v,))
                transient.append(0)
                continue
            rd: set[int] = set()
            tr = 0
            for j in a.microbatches(n):
                key = (a.minibatch, j)
                v = fwd[key]
                bwd[key] = k
                first_bwd.setdefault(a.minibatch, j)
                rd.update(policy.backward_reads(v, k))
                tr = max(tr, int(policy.needs_transient(v, k)))
            reads.append(tuple(sorted(rd)))
            transient.append(tr)
        if policy.forward == "predicted":  # a prediction is built where its d is not 0
            for i, a in enumerate(prog):
                if a.kind == "F":
                    key = (a.minibatch, a.microbatch or 0)
                    transient[i] = int(bwd.get(key, fwd[key]) != fwd[key])
        # when is each version last needed, and when is it replaced as the latest?
        last_read: dict[int, int] = {}
        for i, r in enumerate(reads):
            for v in r:
                last_read[v] = i
        replaced: dict[int, int] = {}
        u = 0
        for i, a in enumerate(prog):
            if a.kind == "U":
                replaced[u] = i
                u += 1
        end = len(prog) - 1
        keep_until: dict[int, int] = {}
        stash_at: set[int] = set()
        for v in range(u + 1):
            if v not in replaced:  # the final latest version
                keep_until[v] = end
            elif last_read.get(v, -1) > replaced[v]:
                keep_until[v] = last_read[v]
                stash_at.add(replaced[v])
            else:
                keep_until[v] = replaced[v] - 1
        born = {0: 0}
        born.update({v + 1: i for v, i in replaced.items()})
        # versions alive at each index: +1 where one is born, -1 after its last index
        change = [0] * (len(prog) + 1)
        for v, until in keep_until.items():
            if born[v] <= until:
                change[born[v]] += 1
                change[until + 1] -= 1
        held = tuple(itertools.accumulate(change[:-1]))
        plans.append(
            StagePlan(
                stage=s,
                forward_version=fwd,
                backward_version=bwd,
                reads=tuple(reads),
                keep_until=keep_until,
                stash_at=frozenset(stash_at),
                held=held,
                transient=tuple(transient),
                extra_buffers=policy.extra_buffers,
                first_backward=first_bwd,
            )
        )
    return plans
