"""The public training API: :class:`Pipeline`.

Example::

    pipe = timeprest.Pipeline(
        stages,                                   # list[nn.Module], one per stage
        method="i-timeprest",
        num_microbatches=2,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        loss_fn=torch.nn.functional.mse_loss,
    )
    losses = pipe.train(batches)   # one float per mini-batch; the pipeline drains at the end
    pipe.report                    # versions, staleness and memory figures
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from timeprest.errors import ConfigError
from timeprest.policy.methods import get_method, resolve_policy, warn_multiple_sequence
from timeprest.policy.plan import StagePlan, plan_versions
from timeprest.policy.rules import Policy, Significance
from timeprest.report import MinibatchReport, Report, StageReport, StageStep
from timeprest.schedule.builders import Schedule, build_schedule
from timeprest.schedule.costs import CostSpec, resolve_costs
from timeprest.stage import LossFn, OptimizerFactory, SplitBatches, StageRunner

if TYPE_CHECKING:
    from pathlib import Path

    from timeprest.engine.runtime import DistributedRuntime, RuntimeOptions

ENGINES = ("emulate", "distributed")

StageSpec = Sequence[nn.Module | None] | Callable[[int], nn.Module]


class Pipeline:
    """Pipeline-parallel training of ``stages`` with a method's schedule and weight policy.

    ``method`` names a preset (DESIGN section 6); ``schedule``, ``forward``,
    ``backward``, ``grad_rule``, ``significance`` and ``decay`` override its
    parts one by one. ``optimizer`` is called once per stage with that
    stage's trainable parameters. ``loss_fn(output, target)`` returns the mean
    loss of a micro-batch. ``costs`` (``default``, ``paper`` or per-stage
    :class:`~timeprest.schedule.Costs`) orders the asynchronous schedules.
    ``lr_lambda(minibatch)`` scales each optimizer's initial learning rate at
    the update of that (global) mini-batch, like ``LambdaLR`` per step.

    ``stages`` is a list of modules or a callable ``stage_fn(stage) -> nn.Module``
    (then give ``num_stages``, except with the distributed engine). With
    ``engine="distributed"`` each process of a torchrun job runs one stage (rank r
    runs stage r) and builds only its own: the other list slots may be None, and
    ``runtime`` sets timeouts and threads (see :mod:`timeprest.engine.runtime`).
    """

    def __init__(
        self,
        stages: StageSpec,
        method: str = "v-timeprest",
        num_microbatches: int | None = None,
        optimizer: OptimizerFactory | None = None,
        loss_fn: LossFn | None = None,
        *,
        schedule: str | None = None,
        forward: str | None = None,
        backward: str | None = None,
        grad_rule: str | None = None,
        significance: str | Callable[[int], float] | Significance | None = None,
        decay: float | None = None,
        costs: CostSpec = "default",
        seed: int = 0,
        engine: str = "emulate",
        lr_lambda: Callable[[int], float] | None = None,
        num_stages: int | None = None,
        runtime: RuntimeOptions | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
        self._runtime: DistributedRuntime | None = None
        if engine == "distributed":
            from timeprest.engine.runtime import DistributedRuntime

            self._runtime = DistributedRuntime(runtime)
            stage_list = self._runtime.local_stages(stages, num_stages)
        else:
            stage_list = _build_stages(stages, num_stages)
        if optimizer is None:
            raise ConfigError(
                "optimizer is required: a callable params -> torch.optim.Optimizer, "
                "e.g. lambda p: torch.optim.SGD(p, lr=0.1)"
            )
        if not callable(optimizer) or (loss_fn is not None and not callable(loss_fn)):
            raise ConfigError("optimizer and loss_fn must be callables")
        if loss_fn is None:
            raise ConfigError("loss_fn is required, e.g. torch.nn.functional.cross_entropy")
        self.method = get_method(method)
        self.schedule_kind, self.policy = resolve_policy(
            method,
            schedule=schedule,
            forward=forward,
            backward=backward,
            grad_rule=grad_rule,
            significance=significance,
            decay=decay,
        )
        w = len(stage_list)
        n = num_microbatches
        if n is None:
            n = self.method.default_microbatches or w
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"num_microbatches must be an integer >= 1, got {n!r}")
        if self.schedule_kind == "2bw" and n < w:
            raise ConfigError(
                f"{method} (schedule 2bw) needs num_microbatches >= number of stages, "
                f"got N={n}, W={w}"
            )
        if self.policy.forward == "previous" and self.schedule_kind != "2bw":
            raise ConfigError(
                "forward rule 'previous' needs the 2bw schedule (version t-1 must exist)"
            )
        warn_multiple_sequence(method, self.schedule_kind, w, n)
        self.costs = resolve_costs(costs, w)
        self.stages = stage_list  # None where another process runs the stage
        self.num_stages = w
        self.num_microbatches = n
        self.seed = seed
        self.engine = engine
        self.loss_fn = loss_fn

        def runner(s: int, m: nn.Module) -> StageRunner:
            return StageRunner(
                s,
                m,
                w,
                n,
                self.policy,
                optimizer,
                loss_fn if s == w - 1 else None,
                seed=seed,
                lr_lambda=lr_lambda,
            )

        # the stages this process runs: all of them, or its own (distributed)
        local = [(s, m) for s, m in enumerate(stage_list) if m is not None]
        if self._runtime is None:
            self.runners = [runner(s, m) for s, m in local]
        else:
            self.runners = [self._runtime.agreed("building the stage", lambda: runner(*local[0]))]
        self.report = Report(stages=[StageReport(s) for s in range(w)])
        self.minibatches_done = 0
        self._schedules: dict[int, tuple[Schedule, list[StagePlan]]] = {}
        self._refresh_stage_reports()

    # -- schedule ------------------------------------------------------------
    def schedule_for(self, num_minibatches: int) -> Schedule:
        """The schedule this pipeline runs for ``num_minibatches`` mini-batches."""
        return self._schedule_and_plan(num_minibatches)[0]

    def _schedule_and_plan(self, num_minibatches: int) -> tuple[Schedule, list[StagePlan]]:
        if num_minibatches not in self._schedules:
            sched = build_schedule(
                self.schedule_kind,
                self.num_stages,
                self.num_microbatches,
                num_minibatches,
                self.costs,
                warn=False,
            )
            self._schedules[num_minibatches] = (sched, plan_versions(sched, self.policy))
        return self._schedules[num_minibatches]

    # -- training ------------------------------------------------------------
    def train(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        on_loss: Callable[[int, float], None] | None = None,
    ) -> list[float]:
        """Train on ``batches`` (one optimizer step per mini-batch at every stage) and drain.

        Returns the loss of each mini-batch, in order: ``sum_j (n_j/n) * loss_j``
        computed at the forward. ``on_loss(minibatch, loss)`` is called as soon
        as each mini-batch's loss is known (for progress displays).
        """
        if self._runtime is not None:
            return self._runtime.train(self, batches, on_loss)
        from timeprest.engine.emulator import run_emulated

        data = self._check_batches(batches)
        if not data:
            return []
        sched, plans = self._schedule_and_plan(len(data))
        source = SplitBatches(data, self.num_microbatches)
        for r, plan in zip(self.runners, plans):
            r.begin(plan, self.minibatches_done)
        self.runners[-1].on_loss = on_loss
        try:
            run_emulated(sched, self.runners, source)
        finally:
            self.runners[-1].on_loss = None
        losses = [self.runners[-1].losses[t] for t in range(len(data))]
        for t in range(len(data)):
            self.report.minibatches.append(
                MinibatchReport(
                    self.minibatches_done + t,
                    losses[t],
                    [r.steps.get(t, StageStep()) for r in self.runners],
                )
            )
        self.minibatches_done += len(data)
        self._refresh_stage_reports()
        return losses

    def _check_batches(
        self, batches: Iterable[tuple[Tensor, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        data: list[tuple[Tensor, Tensor]] = []
        for t, b in enumerate(batches):
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                raise ConfigError(f"mini-batch {t} is not an (input, target) pair")
            x, y = b
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise ConfigError(f"mini-batch {t}: input and target must be tensors")
            if x.dim() == 0 or y.dim() == 0:
                raise ConfigError(f"mini-batch {t}: input and target need a batch dimension")
            if x.shape[0] != y.shape[0]:
                raise ConfigError(
                    f"mini-batch {t}: input has {x.shape[0]} rows but target has {y.shape[0]}"
                )
            if x.shape[0] < self.num_microbatches:
                raise ConfigError(
                    f"mini-batch {t} has {x.shape[0]} rows, fewer than the "
                    f"{self.num_microbatches} micro-batches: lower num_microbatches or "
                    "raise the batch size"
                )
            data.append((x, y))
        return data

    def _refresh_stage_reports(self) -> None:
        for r in self.runners:
            rep = self.report.stages[r.index]
            rep.weight_bytes = r.store.bytes_per_version
            rep.peak_versions = r.store.peak_versions
            rep.peak_weight_bytes = r.store.peak_bytes
            rep.peak_activation_bytes = r.peak_activation_bytes
            rep.activation_bytes = list(r.activation_log)
            rep.optimizer_state_bytes = r.optimizer_state_bytes()
            rep.updates = r.store.latest

    # -- state ---------------------------------------------------------------
    def version(self, stage: int) -> int:
        """Updates applied so far at ``stage`` (its latest version)."""
        for r in self.runners:
            if r.index == stage:
                return r.store.latest
        return self.report.stages[stage].updates  # another process's stage, as last reported

    @property
    def optimizers(self) -> list[torch.optim.Optimizer | None]:
        """One per stage; None for a stage that another process runs."""
        out: list[torch.optim.Optimizer | None] = [None] * self.num_stages
        for r in self.runners:
            out[r.index] = r.optimizer
        return out

    # -- checkpoints -----------------------------------------------------------
    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write the state of the drained pipeline (between ``train`` calls) to ``directory``.

        One ``stage{s}.pt`` per stage (weights with buffers, optimizer state,
        version counter, RNG states, mini-batch cursor), each written atomically,
        then ``manifest.json`` with the configuration hash. Both engines share the
        format; with the distributed engine call it on every rank (each writes
        its own stage).
        """
        from timeprest.checkpoint import save_checkpoint

        return save_checkpoint(self, directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote; training then resumes bitwise."""
        from timeprest.checkpoint import load_checkpoint

        load_checkpoint(self, directory)

    def describe(self) -> dict[str, Any]:
        """The resolved configuration, for logs and run directories."""
        sig = self.policy.significance
        return {
            "method": self.method.name,
            "schedule": self.schedule_kind,
            "forward": self.policy.forward,
            "backward": self.policy.backward,
            "grad_rule": self.policy.grad_rule,
            "significance": sig.kind,
            "decay": sig.decay,
            "num_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "costs": self.costs.name,
            "seed": self.seed,
            "engine": self.engine,
        }


def _build_stages(stages: StageSpec, num_stages: int | None) -> list[nn.Module | None]:
    """Every stage, for the emulator: the list given, or ``stage_fn`` called per stage."""
    if isinstance(stages, nn.Module) or not (callable(stages) or isinstance(stages, Sequence)):
        raise ConfigError(
            "stages must be a list of nn.Module, one per stage, or a callable "
            "stage_fn(stage) -> nn.Module (use timeprest.split(model, num_stages) to cut a model)"
        )
    if callable(stages):
        if num_stages is None:
            raise ConfigError("with a stage_fn callable, give num_stages too")
        built: list[Any] = [stages(s) for s in range(num_stages)]
    else:
        built = list(stages)
        if num_stages is not None and num_stages != len(built):
            raise ConfigError(f"num_stages={num_stages} but {len(built)} stages were given")
    if len(built) == 0:
        raise ConfigError("the stage list is empty: give at least one nn.Module")
    for i, m in enumerate(built):
        if not isinstance(m, nn.Module):
            raise ConfigError(f"stage {i} is a {type(m).__name__}, not an nn.Module")
    return built


def policy_of(pipe: Pipeline) -> Policy:
    return pipe.policy
