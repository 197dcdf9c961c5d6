"""What an engine is: it runs lowered programs over stage runners and says what happened.

:class:`~timeprest.Pipeline` owns everything an engine does not: the checks
on the configuration and on each mini-batch, the schedule and version plan,
the report and the mini-batch cursor. An engine is given a :class:`Job`
(the batches, how to check one, how to plan a schedule of T mini-batches,
this process's runners) and returns an :class:`Outcome` (the losses and the
version facts of every stage, whatever process ran it). Two engines exist:
the emulator (:mod:`timeprest.engine.emulator`, every stage here) and the
distributed runtime (:mod:`timeprest.engine.runtime`, one stage per
process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from torch import nn

from timeprest.policy.plan import StagePlan
from timeprest.report import StageReport, StageStep
from timeprest.schedule.lower import Lowered
from timeprest.stage import Minibatch, StageRunner

T = TypeVar("T")
StageSpec = Sequence[nn.Module | None] | Callable[[int], nn.Module]
Plan = Callable[[int], tuple[Lowered, list[StagePlan]]]


@dataclass
class Job:
    """One ``Pipeline.train`` call, as an engine sees it."""

    batches: Iterable[object]
    num_minibatches: int | None  # known up front (len() or the caller's count), else None
    check: Callable[[int, object], Minibatch]  # validates mini-batch t (raises ConfigError)
    plan: Plan  # the lowered schedule and version plan for T mini-batches
    runners: Sequence[StageRunner]  # the stages this process runs
    num_microbatches: int
    base_minibatch: int  # mini-batches trained before this call
    config: dict[str, Any]  # what every process must agree on
    on_loss: Callable[[int, float], None] | None = None

    def counted(self) -> tuple[Iterable[object], int]:
        """The batches and how many there are; an iterable of unknown length is read into a
        list first, since a schedule is built for a known number of mini-batches."""
        if self.num_minibatches is not None:
            return self.batches, self.num_minibatches
        batches = list(self.batches)
        return batches, len(batches)

    # data parallel (docs/design.md section 10): the runners of replicas 1..D-1 in the
    # emulator (``runners`` is replica 0); empty with one replica or in the runtime
    replicas: Sequence[Sequence[StageRunner]] = ()


@dataclass
class Outcome:
    """What a run did: a loss per mini-batch and, per stage, each mini-batch's version facts."""

    losses: list[float]
    steps: list[dict[int, StageStep]]  # per stage: mini-batch (of this call) -> facts
    stage_reports: list[StageReport]  # per stage, after the run


class Engine(Protocol):
    name: str

    def build_stages(self, stages: StageSpec, num_stages: int | None) -> list[nn.Module | None]:
        """The stage list of this process: the modules it runs, None for the others."""
        ...

    def agreed(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; if it raises in any process, raise in every process."""
        ...

    def gather_stages(self, values: list[Any], what: str) -> list[Any]:
        """One value per stage, in stage order, in every process, from ``values``: one per
        runner of this process (replica 0's stages where there are replicas)."""
        ...

    def run(self, job: Job) -> Outcome: ...
