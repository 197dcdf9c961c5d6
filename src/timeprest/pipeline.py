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

The pipeline owns the checks (configuration through :func:`timeprest.policy.resolve`,
each mini-batch once), the schedule and its version plan, the report and the
mini-batch cursor; an engine (:mod:`timeprest.engine`) only runs the lowered
programs over the stage runners.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from timeprest.checkpoint import load_checkpoint, save_checkpoint
from timeprest.engine.emulator import Emulator
from timeprest.engine.protocol import Engine, Job, StageSpec
from timeprest.errors import ConfigError
from timeprest.policy.methods import DEFAULT_METHOD, RemedyOverrides, resolve
from timeprest.policy.plan import StagePlan, plan_versions
from timeprest.policy.rules import Significance
from timeprest.report import (
    DEFAULT_DISTANCE_EVERY,
    MinibatchReport,
    Report,
    StageReport,
    StageStep,
)
from timeprest.schedule.builders import (
    SCHEDULE_KINDS,
    Schedule,
    build_schedule,
    schedule_from_text,
)
from timeprest.schedule.costs import CostSpec, resolve_costs
from timeprest.schedule.lower import Lowered, lower
from timeprest.stage import LossFn, Minibatch, OptimizerFactory, StageRunner
from timeprest.stage.replicas import replica_seed
from timeprest.stage.sync import Tied, attach_update_rules
from timeprest.stage.timing import action_costs

if TYPE_CHECKING:
    from timeprest.engine.runtime import RuntimeOptions
    from timeprest.engine.runtime.layout import Layout

ENGINES = ("emulate", "distributed")


def _remedy_overrides(remedies: RemedyOverrides) -> RemedyOverrides:
    unknown = sorted(set(remedies) - set(RemedyOverrides.__annotations__))
    if unknown:
        raise ConfigError(
            f"unknown Pipeline argument {unknown[0]!r}: the remedy settings are "
            f"{', '.join(RemedyOverrides.__annotations__)}"
        )
    return remedies


def _count(batches: object, num_minibatches: int | None) -> int | None:
    """How many mini-batches ``batches`` holds: ``num_minibatches``, else ``len()`` where it
    has one, else None (an iterator, counted as it is read)."""
    count = num_minibatches
    if count is None and isinstance(batches, Sized):
        count = len(batches)
    if count is not None and (not isinstance(count, int) or count < 0):
        raise ConfigError(f"num_minibatches must be an integer >= 0, got {count!r}")
    return count


class Pipeline:
    """Pipeline-parallel training of ``stages`` with a method's schedule and weight policy.

    ``method`` names a preset (docs/design.md section 6; default
    :data:`timeprest.policy.DEFAULT_METHOD`); ``schedule``, ``forward``, ``backward``,
    ``grad_rule``, ``significance`` and ``decay`` override its parts one by one, and so
    do the remedies of docs/design.md section 12 (keywords ``correction``,
    ``lr_rule``, ``gamma``, ``dc_lambda``, ``gap_beta``, ``gap_eps``,
    ``pipemare_warmup``).
    ``schedule`` is a kind (``gpipe``, ``1f1b``, ``nf1b``, ``2bw``), or a custom
    :class:`~timeprest.schedule.Schedule` or program text (see :func:`timeprest.schedule.schedule_from_text`),
    which then runs exactly as given for its number of mini-batches.
    ``optimizer`` is called once per stage with that stage's trainable parameters.
    ``loss_fn(output, target)`` returns the mean loss of a micro-batch. ``costs``
    (``default``, ``paper`` or per-stage :class:`~timeprest.schedule.Costs`) orders the
    asynchronous schedules. ``lr_lambda(minibatch)`` scales each optimizer's initial
    learning rate at the update of that (global) mini-batch, like ``LambdaLR`` per step.
    ``precision`` (``fp32``, ``bf16``, ``fp16`` with a static ``loss_scale``), ``clip_grad_norm`` with ``clip_scope`` (``stage``,
    or ``global`` for flush schedules) and ``tied`` (tensors several stages hold a copy of,
    as (stage, parameter name) places) are docs/design.md section 11's.
    ``distance_every``: the report's relative distance of the backward weights is
    measured at every K-th mini-batch (a pass over the weights; 1 for all).
    ``fused_accumulation``: wide ``nn.Linear`` layers add each micro-batch's weight
    gradient into the accumulator in the product itself, where that gives bitwise the
    same sums (:mod:`timeprest.stage.fused`); False keeps autograd's product and add.

    ``stages`` is a list of modules or a callable ``stage_fn(stage) -> nn.Module``
    (then give ``num_stages``, except with the distributed engine). With
    ``engine="distributed"`` each process of a torchrun job runs one stage (rank r
    runs stage r) and builds only its own: the other list slots may be None, and
    ``runtime`` sets timeouts and threads (see :mod:`timeprest.engine.runtime`).

    ``data_parallel=D`` trains D replicas of the pipeline, each on part r of
    ``torch.tensor_split(batch, D)``, combining their gradients before every update
    (docs/design.md section 10). The emulator runs them all here: the stages given are
    replica 0, the others deep copies. The distributed engine needs ``D x W``
    processes, rank ``replica * W + stage``, or the layout of ``device_mesh`` (a 2-D
    ``DeviceMesh`` with dimensions ``("dp", "pp")``). Losses are the whole
    mini-batch's; ``runners``, the report and checkpoints are replica 0's.
    """

    def __init__(
        self,
        stages: StageSpec,
        method: str = DEFAULT_METHOD,
        num_microbatches: int | None = None,
        optimizer: OptimizerFactory | None = None,
        loss_fn: LossFn | None = None,
        *,
        schedule: str | Schedule | None = None,
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
        precision: str = "fp32",
        loss_scale: float | None = None,
        clip_grad_norm: float | None = None,
        clip_scope: str = "stage",
        tied: Sequence[Tied] = (),
        data_parallel: int = 1,
        device_mesh: Any = None,
        distance_every: int = DEFAULT_DISTANCE_EVERY,
        fused_accumulation: bool = True,
        **remedies: Unpack[RemedyOverrides],
    ) -> None:
        bad = isinstance(data_parallel, bool) or not isinstance(data_parallel, int)
        if bad or data_parallel < 1:
            raise ConfigError(f"data_parallel must be an integer >= 1, got {data_parallel!r}")
        bad = isinstance(distance_every, bool) or not isinstance(distance_every, int)
        if bad or distance_every < 1:
            raise ConfigError(f"distance_every must be an integer >= 1, got {distance_every!r}")
        if device_mesh is not None and engine != "distributed":
            raise ConfigError("device_mesh is for engine='distributed'")
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
        self._engine: Engine
        if engine == "distributed":
            from timeprest.engine.runtime import DistributedRuntime

            self._engine = DistributedRuntime(runtime, data_parallel, device_mesh)
            self._layout: Layout | None = self._engine.layout
            data_parallel = self._engine.layout.num_replicas
        else:
            self._engine = Emulator()
            self._layout = None
        stage_list = self._engine.build_stages(stages, num_stages)
        if optimizer is None:
            raise ConfigError(
                "optimizer is required: a callable params -> torch.optim.Optimizer, "
                "e.g. lambda p: torch.optim.SGD(p, lr=0.1)"
            )
        if not callable(optimizer) or (loss_fn is not None and not callable(loss_fn)):
            raise ConfigError("optimizer and loss_fn must be callables")
        if loss_fn is None:
            raise ConfigError("loss_fn is required, e.g. torch.nn.functional.cross_entropy")
        w = len(stage_list)
        self._custom: Schedule | None = None
        if isinstance(schedule, str) and schedule not in SCHEDULE_KINDS and schedule.strip():
            if any(ch.isdigit() for ch in schedule):  # program text, not a kind's name
                schedule = schedule_from_text(schedule, costs)
        if isinstance(schedule, Schedule):
            self._custom = schedule
            if schedule.num_stages != w:
                raise ConfigError(f"the schedule has {schedule.num_stages} stages, the model {w}")
            if num_microbatches not in (None, schedule.num_microbatches):
                raise ConfigError(
                    f"num_microbatches={num_microbatches} but the schedule's programs use "
                    f"N={schedule.num_microbatches}"
                )
            num_microbatches = schedule.num_microbatches
        resolved = resolve(
            method,
            w,
            num_microbatches,
            schedule=schedule if isinstance(schedule, str) else None,
            forward=forward,
            backward=backward,
            grad_rule=grad_rule,
            significance=significance,
            decay=decay,
            **_remedy_overrides(remedies),
            warn=self._custom is None,
            stacklevel=3,
        )
        self.method = resolved.method
        self.schedule_kind = resolved.schedule if self._custom is None else self._custom.kind
        self.policy = resolved.policy
        self.costs = self._custom.costs if self._custom is not None else resolve_costs(costs, w)
        self.stages = stage_list  # None where another process runs the stage
        self.num_stages = w
        self.num_microbatches = n = resolved.num_microbatches
        self.seed = seed
        self.engine = engine
        self.loss_fn = loss_fn
        self.data_parallel = data_parallel

        def runner(s: int, m: nn.Module, replica: int = 0) -> StageRunner:
            last = s == w - 1
            return StageRunner(
                s, m, w, n, self.policy, optimizer, loss_fn if last else None,
                seed=replica_seed(seed, replica), lr_lambda=lr_lambda,
            )  # fmt: skip

        # the stages this process runs: all of them, or its own (distributed)
        local = [(s, m) for s, m in enumerate(stage_list) if m is not None]
        # data parallel, emulated: replicas 1..D-1 start as copies of the stages given
        self._replicas: list[list[StageRunner]] = []
        if engine == "emulate":
            self.runners = [runner(s, m) for s, m in local]
            self._replicas = [
                [runner(s, copy.deepcopy(m), r) for s, m in local] for r in range(1, data_parallel)
            ]
        else:
            assert self._layout is not None
            replica = self._layout.replica
            self.runners = [
                self._engine.agreed("building the stage", lambda: runner(*local[0], replica))
            ]
        if data_parallel > 1 and self.policy.correction.kind == "dc":
            # g * g of each replica's part is not that of the whole mini-batch (docs/design.md 12)
            raise ConfigError(
                "the dc gradient correction is not supported with data_parallel > 1 yet: "
                "its g * g term needs the replicas' combined gradient"
            )
        # docs/design.md section 11: autocast, clipping, tied tensors' gradients summed
        for replica_runners in (self.runners, *self._replicas):
            attach_update_rules(
                replica_runners, precision=precision, loss_scale=loss_scale,
                clip_grad_norm=clip_grad_norm,
                clip_scope=clip_scope, tied=tied, schedule=self.schedule_kind, engine=engine,
            )  # fmt: skip
        global_norm = clip_scope == "global" and clip_grad_norm is not None
        if data_parallel > 1 and (tied or global_norm):
            # the group would meet the other stage's gradients before their replicas' sum
            raise ConfigError(
                "tied tensors and --clip-scope global are not supported with data_parallel > 1 "
                "yet: use data_parallel=1, or per-stage clipping without tied tensors"
            )
        if not isinstance(fused_accumulation, bool):
            raise ConfigError(
                f"fused_accumulation must be True or False, got {fused_accumulation!r}"
            )
        for r in (r for rs in (self.runners, *self._replicas) for r in rs):
            r.distance_every = distance_every
            if not fused_accumulation:
                r.fused.disable()
        self.report = Report(stages=[StageReport(s) for s in range(w)])
        for r in self.runners:
            self.report.stages[r.index] = r.report()
        self.minibatches_done = 0
        self._plans: dict[int, tuple[Lowered, list[StagePlan]]] = {}

    # -- schedule ------------------------------------------------------------
    def schedule_for(self, num_minibatches: int) -> Schedule:
        """The schedule this pipeline runs for ``num_minibatches`` mini-batches."""
        return self._plan(num_minibatches)[0].schedule

    def _plan(self, num_minibatches: int) -> tuple[Lowered, list[StagePlan]]:
        if num_minibatches not in self._plans:
            if self._custom is not None:
                if num_minibatches != self._custom.num_minibatches:
                    raise ConfigError(
                        f"the custom schedule is for {self._custom.num_minibatches} "
                        f"mini-batches, but {num_minibatches} were given"
                    )
                sched = self._custom
            else:
                sched = build_schedule(
                    self.schedule_kind,
                    self.num_stages,
                    self.num_microbatches,
                    num_minibatches,
                    self.costs,
                    warn=False,
                )
            self._plans[num_minibatches] = (lower(sched), plan_versions(sched, self.policy))
        return self._plans[num_minibatches]

    # -- training ------------------------------------------------------------
    def train(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        on_loss: Callable[[int, float], None] | None = None,
        num_minibatches: int | None = None,
    ) -> list[float]:
        """Train on ``batches`` (one optimizer step per mini-batch at every stage) and drain.

        ``batches`` is any iterable of ``(input, target)`` pairs, read lazily with the
        emulator when its length is known (``len()``, or ``num_minibatches`` for an
        iterator): mini-batch t is pulled when stage 0 first needs it and dropped after
        its last use. Returns the loss of each mini-batch, in order:
        ``sum_j (n_j/n) * loss_j`` computed at the forward. ``on_loss(minibatch, loss)``
        is called as soon as each mini-batch's loss is known. ``pipe.report`` then holds
        this call's mini-batch records (each call replaces them, so memory stays flat).
        """
        count = _count(batches, num_minibatches)
        c = self.costs
        job = Job(
            batches=batches,
            num_minibatches=count,
            check=self._check_batch,
            plan=self._plan,
            runners=self.runners,
            num_microbatches=self.num_microbatches,
            base_minibatch=self.minibatches_done,
            config={
                **self.describe(),
                "costs_values": [c.forward, c.backward, c.update, c.comm, c.paper],
                "minibatches_done": self.minibatches_done,
            },
            on_loss=on_loss,
            replicas=self._replicas,
        )
        outcome = self._engine.run(job)
        base = self.minibatches_done
        self.report.stages = list(outcome.stage_reports)
        self.report.minibatches = [
            MinibatchReport(base + t, loss, [steps.get(t, StageStep()) for steps in outcome.steps])
            for t, loss in enumerate(outcome.losses)
        ]
        self.minibatches_done += len(outcome.losses)
        return outcome.losses

    def time_actions(
        self,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        skip: int | None = None,
        num_minibatches: int | None = None,
    ) -> list[tuple[float, float, float]]:
        """Train on ``batches`` as :meth:`train` does, timing every action; each stage's
        forward and backward seconds per micro-batch and update seconds, as this engine
        runs them.

        The first ``skip`` mini-batches of the call (default: the number of stages,
        the pipeline's fill) are left out, and so is the time receives spend waiting for a
        message on its way (``timeprest.stage.timing.action_costs``). With the distributed
        engine every process gets every stage's figures (replica 0's), timed where
        each runs: a cost model of that run, sends and receives included, for
        :func:`timeprest.sim.simulate` with the link's latency and bandwidth and no
        per-message overhead (docs/simulator.md). The training is real: the weights,
        the report and ``minibatches_done`` move on as with :meth:`train`. On CUDA
        (NCCL) a receive's wait does not hold the CPU, so the waiting there stays in
        the action that follows it. The runners' ``action_times`` lists are replaced
        for the call and unset after it.
        """
        skip = self.num_stages if skip is None else skip
        if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
            raise ConfigError(f"skip must be an integer >= 0, got {skip!r}")
        count = _count(batches, num_minibatches)

        def too_few(given: int) -> ConfigError:
            return ConfigError(
                f"time_actions got {given} mini-batches and skips the first {skip}: "
                f"give more than {skip}, or a smaller skip"
            )

        if count is not None and count <= skip:  # known before any training
            raise too_few(count)
        base = self.minibatches_done
        for r in self.runners:
            r.action_times = []
        try:
            self.train(batches, num_minibatches=num_minibatches)
            if self.minibatches_done - base <= skip:  # an iterator that held fewer
                raise too_few(self.minibatches_done - base)

            def costs() -> list[tuple[float, float, float]]:
                return [action_costs(r.action_times or [], base + skip) for r in self.runners]

            mine = self._engine.agreed("reading the action times", costs)
        finally:
            for r in self.runners:
                r.action_times = None
        return self._engine.gather_stages(mine, "the action-time exchange")

    def _check_batch(self, t: int, b: object) -> Minibatch:
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
        n, d = self.num_microbatches, self.data_parallel
        if x.shape[0] < n * d:
            parts = f"{d} replicas x {n} micro-batches" if d > 1 else f"{n} micro-batches"
            fix = "data_parallel or num_microbatches" if d > 1 else "num_microbatches"
            raise ConfigError(
                f"mini-batch {t} has {x.shape[0]} rows, fewer than the {parts}: lower {fix} "
                "or raise the batch size"
            )
        return (x, y)

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
    def _checkpoint_config(self) -> dict[str, Any]:
        """What a checkpoint must agree on with the pipeline that loads it (not the engine)."""
        c = self.costs
        # a checkpoint holds one copy per stage: it resumes with any engine and any D
        skip = ("engine", "data_parallel")
        config = {k: v for k, v in self.describe().items() if k not in skip}
        config["costs_values"] = [list(c.forward), list(c.backward), list(c.update), list(c.comm)]
        return config

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write the state of the drained pipeline (between ``train`` calls) to ``directory``.

        One ``stage{s}.pt`` per stage (weights with buffers, optimizer state,
        version counter, RNG states, mini-batch cursor), each written atomically,
        then ``manifest.json`` with the configuration hash. Both engines share the
        format; with the distributed engine call it on every rank (each writes
        its own stage).
        """
        # one copy per stage: replica 0's (the other replicas hold the same state)
        return save_checkpoint(
            self.runners if self._engine_replica() == 0 else [],
            self.minibatches_done,
            self._checkpoint_config(),
            self.num_stages,
            directory,
            agreed=self._engine.agreed,
        )

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote; training then resumes bitwise."""
        for runners in [self.runners, *self._replicas]:  # every replica loads the same state
            self.minibatches_done = load_checkpoint(
                runners,
                self._checkpoint_config(),
                self.num_stages,
                directory,
                agreed=self._engine.agreed,
            )
        for r in self.runners:
            self.report.stages[r.index] = r.report()

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
            **self.policy.describe_remedies(),
            "num_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "costs": self.costs.name,
            "seed": self.seed,
            "engine": self.engine,
            "data_parallel": self.data_parallel,
        }

    def _engine_replica(self) -> int:
        """The replica this process's runners belong to (0 in the emulator)."""
        return 0 if self._layout is None else self._layout.replica
