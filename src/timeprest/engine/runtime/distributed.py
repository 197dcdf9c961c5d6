"""The distributed engine: one process per stage over ``torch.distributed``.

Rank ``r`` runs stage ``r`` (with D data-parallel replicas, rank ``replica * W
+ stage`` or a ``DeviceMesh``'s layout: :mod:`.layout`): the same lowered program and the same
:class:`~timeprest.stage.StageRunner` code as the emulator, through the same
executor; only the transport differs (point-to-point ``isend``/``irecv``
instead of a mailbox), so the results are bitwise those of the emulator on
CPU. Every rank validates the same configuration and batches before the
first message, and a failure anywhere stops every rank
(:mod:`timeprest.engine.runtime.failures`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from timeprest._version import __version__
from timeprest.engine.allocator import keep_freed_memory
from timeprest.engine.executor import StageExecutor
from timeprest.engine.protocol import Job, Outcome, StageSpec
from timeprest.engine.runtime.failures import (
    CommError,
    diagnose,
    failure_record,
    first_line,
    publish,
    read_records,
    stage_name,
)
from timeprest.engine.runtime.group import (
    SHUT_DOWN,
    RuntimeOptions,
    control_group,
    forget_control_group,
    init_distributed,
    p2p_groups,
    register,
)
from timeprest.engine.runtime.layout import Layout, default_layout, dp_group, mesh_layout
from timeprest.engine.runtime.p2p import P2PTransport
from timeprest.engine.runtime.reduce import DistributedReduction
from timeprest.engine.runtime.shm import ShmLinks, ShmTransport, make_transport, open_links
from timeprest.engine.runtime.wire import Spec
from timeprest.errors import ConfigError, DataError, ScheduleError, StageFailure
from timeprest.schedule.builders import Schedule
from timeprest.stage import Minibatch, NoBatches, SplitBatches, microbatch_rows
from timeprest.stage.replicas import combine_losses, part_rows, part_weights, replica_part

T = TypeVar("T")


def fingerprint(values: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able dictionary."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DistributedRuntime:
    """The per-process side of ``Pipeline(engine="distributed")``.

    Constructing it is collective: every rank must create its pipelines in
    the same order.
    """

    name = "distributed"

    def __init__(
        self, options: RuntimeOptions | None = None, data_parallel: int = 1, mesh: Any = None
    ) -> None:
        self.options = options or RuntimeOptions()
        self.info = init_distributed(self.options)
        self.rank = self.info.rank
        self.world_size = self.info.world_size
        if mesh is not None:
            self.layout: Layout = mesh_layout(mesh, self.rank, self.world_size)
            if data_parallel not in (1, self.layout.num_replicas):
                raise ConfigError(
                    f"data_parallel={data_parallel} but the device mesh has "
                    f"{self.layout.num_replicas} replicas along 'dp'"
                )
        else:
            self.layout = default_layout(self.rank, self.world_size, data_parallel)
        self.group: Any = control_group(self.options.timeout)
        self.dp_group: Any = dp_group(self.layout, mesh, self.options.timeout)
        self.instance = register(self)
        store = dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"timeprest/{self.instance}/", store)
        self.broken: str | None = None
        # activation (shape, dtype) per micro-batch size into and out of this stage,
        # agreed by headers and kept for the pipeline's life
        self.shapes_in: dict[int, Spec] = {}
        self.shapes_out: dict[int, Spec] = {}
        self._transport: P2PTransport | ShmTransport | None = None
        self._links: ShmLinks | None = None  # opened below; a failure before then has none
        # weight-sized tensors come and go at every micro-batch (a bad setting fails everywhere)
        self.agreed("the allocator's settings", keep_freed_memory)
        # the stage-to-stage transport, chosen and set up once per pipeline (RuntimeOptions)
        self._links = open_links(
            self.options.transport, self.info.backend, self.layout, self.instance,
            self._all_gather, self.agreed, self.options.spin,
        )  # fmt: skip
        self.transport = "process-group" if self._links is None else "shm"
        # gloo: one group per direction of the stage-to-stage traffic (see P2PTransport)
        self.p2p_groups: dict[str, Any] | None = None
        if self._links is None and self.info.backend == "gloo":
            self.p2p_groups = p2p_groups(self.options.timeout)

    def rank_name(self, rank: int) -> str:
        """How messages name ``rank``: its stage, and its replica with several."""
        return stage_name(rank, self.layout)

    # -- agreement -----------------------------------------------------------------
    def _all_gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` over the control group; if that fails, this rank stops."""
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:
            self._fail(CommError(None, what, exc), what)
        return out

    def agreed(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` here; if it raises on any rank, raise on every rank.

        The failing rank re-raises its own exception, the others a
        :class:`~timeprest.errors.ConfigError` that names it.
        """
        self._check_usable()
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except Exception as exc:
            error = exc
        errors = self._all_gather(None if error is None else first_line(error), what)
        if error is not None:
            raise error
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            raise ConfigError(
                f"{what} failed on " + "; ".join(f"{self.rank_name(r)}: {e}" for r, e in bad)
            )
        return result  # type: ignore[return-value]

    def barrier(self, what: str) -> None:
        self.agreed(what, lambda: None)

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank (over the control group)."""
        self._check_usable()
        box = [value]
        try:
            dist.broadcast_object_list(box, src=src, group=self.group)
        except Exception as exc:
            self._fail(CommError(None, "a broadcast", exc), "a broadcast")
        return box[0]

    def build_stages(self, stages: StageSpec, num_stages: int | None) -> list[nn.Module | None]:
        """The stage list of this rank: its own module built, the other slots None."""

        def build() -> list[nn.Module | None]:
            if isinstance(stages, nn.Module):
                raise ConfigError(
                    "stages must be a list of nn.Module or a callable stage_fn(stage) -> "
                    "nn.Module (use timeprest.split(model, num_stages) to cut a model)"
                )
            if callable(stages):
                w = num_stages if num_stages is not None else self.layout.num_stages
            elif isinstance(stages, Sequence):
                w = len(stages)
                if num_stages is not None and num_stages != w:
                    raise ConfigError(f"num_stages={num_stages} but {w} stages were given")
            else:
                raise ConfigError("stages must be a list of nn.Module or a callable stage_fn")
            d = self.layout.num_replicas
            if d > 1 and w != self.layout.num_stages:
                raise ConfigError(
                    f"the pipeline has {w} stages, but {d} replicas on WORLD_SIZE "
                    f"{self.world_size} make {self.layout.num_stages} stages per replica: "
                    f"launch {d * w} processes (data_parallel x stages)"
                )
            if d == 1 and w != self.world_size:
                raise ConfigError(
                    f"engine='distributed' runs one stage per process: the pipeline has {w} "
                    f"stages but WORLD_SIZE is {self.world_size}; launch "
                    f"`torchrun --nproc-per-node {w}` (or give {self.world_size} stages)"
                )
            stage = self.layout.stage
            module = stages(stage) if callable(stages) else stages[stage]
            if not isinstance(module, nn.Module):
                raise ConfigError(
                    f"stage {stage} is a {type(module).__name__}, not an nn.Module "
                    f"({self.rank_name(self.rank)} runs it)"
                )
            device = self.info.device
            if device.type == "cuda":
                module.to(device)
            else:
                for p in [*module.parameters(), *module.buffers()]:
                    if p.device.type != "cpu":
                        raise ConfigError(
                            f"stage {stage} has tensors on {p.device}, but the process "
                            f"group's backend is {self.info.backend}: use NCCL for GPUs"
                        )
            out: list[nn.Module | None] = [None] * w
            out[stage] = module
            return out

        # a rank that cannot build its stage must not leave the others waiting
        return self.agreed("building the stages", build)

    # -- failure -------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.broken == SHUT_DOWN:
            raise StageFailure(
                "this distributed pipeline's job was shut down "
                "(timeprest.engine.runtime.shutdown); start a new job"
            )
        if self.broken is not None:
            raise StageFailure(
                f"this distributed pipeline stopped after a failure ({self.broken}); "
                "start a new job"
            )

    def _teardown(self) -> None:
        if self._transport is not None:
            self._transport.abandon()
        if self._links is not None:
            self._links.close(notify=True)  # wakes the neighbours waiting on this rank
        forget_control_group()
        try:
            if dist.is_initialized():
                if self.info.backend == "nccl":
                    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
                    if abort is not None:
                        abort()
                        return
                dist.destroy_process_group()  # every group: closes this rank's sockets
        except Exception:
            pass

    def _fail(self, exc: BaseException, where: str) -> NoReturn:
        """Record the failure, tear the process groups down and raise on this rank."""
        record = failure_record(exc, self.rank, where)
        publish(self.store, record)
        message = (
            diagnose(read_records(self.store, self.world_size), record, self.layout)
            if isinstance(exc, CommError)
            else f"{self.rank_name(self.rank)} failed at {where}: {record['error']}"
        )
        self.broken = message
        self._teardown()
        print(f"[timeprest {self.rank_name(self.rank)}] {message}", file=sys.stderr, flush=True)
        if isinstance(exc, CommError):
            raise StageFailure(message) from None
        raise exc

    # -- a run -----------------------------------------------------------------------------
    def _startup(
        self, job: Job, data: list[Minibatch] | None, error: BaseException | None
    ) -> list[int]:
        """Agree on the batches and the configuration; raise the same error on every rank."""
        rows = None if data is None else [int(x.shape[0]) for x, _ in data]
        runner = job.runners[0]
        config = {
            **job.config,
            "pipeline_instance": self.instance,
            "updates": runner.store.latest,
            "timeprest": __version__,
            "torch": torch.__version__,
        }
        mine = {
            "error": None if error is None else first_line(error),
            "rows": rows,
            "config": config,
            "hash": fingerprint(config),
        }
        got = self._all_gather(mine, "the start-up exchange")
        if error is not None:
            raise error
        bad = [(r, g["error"]) for r, g in enumerate(got) if g["error"] is not None]
        if bad:
            raise ConfigError(
                "the batches were rejected on "
                + "; ".join(f"{self.rank_name(r)}: {e}" for r, e in bad)
            )
        if len({g["hash"] for g in got}) > 1:
            diffs = []
            for name in config:
                values = [g["config"].get(name) for g in got]
                if any(v != values[0] for v in values):
                    diffs.append(
                        f"{name}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values))
                    )
            raise ConfigError(
                "the ranks run different configurations (every rank must build the same "
                "Pipeline, in the same order, from the same checkpoint): " + "; ".join(diffs)
            )
        # every rank of the first and the last stage, of every replica, read the batches
        lay = self.layout
        readers = sorted({r for row in lay.ranks for r in (row[0], row[-1])})
        first = got[readers[0]]["rows"]
        for r in readers[1:]:
            last = got[r]["rows"]
            if first != last:
                a, b = lay.position(readers[0])[1], lay.position(r)[1]
                who = "" if lay.num_replicas == 1 else f" ({self.rank_name(r)})"
                raise DataError(
                    f"stage {a} and stage {b}{who} read different batches: stage {a} got "
                    f"{len(first)} mini-batches of {first[:8]}{'...' if len(first) > 8 else ''} "
                    f"rows, stage {b} got {len(last)} of {last[:8]}{'...' if len(last) > 8 else ''}"
                )
        return list(first)

    def _check_schedule(self, schedule: Schedule) -> None:
        text = fingerprint({"programs": schedule.to_text(), "kind": schedule.kind})
        got = self._all_gather(text, "the schedule check")
        if len(set(got)) > 1:
            raise ScheduleError(
                "the ranks built different schedules: "
                + ", ".join(f"rank {r} {h}" for r, h in enumerate(got))
            )

    def run(self, job: Job) -> Outcome:
        """This rank's stage of ``Pipeline.train``; every rank returns the same outcome.

        The first and the last stage read (and check) every mini-batch before the
        first message: the ranks must agree on the batches' row counts, which size
        the receive buffers.
        """
        self._check_usable()
        runner = job.runners[0]
        lay = self.layout
        w, stage, d = lay.num_stages, lay.stage, lay.num_replicas
        data: list[Minibatch] | None = None
        error: BaseException | None = None
        if stage in (0, w - 1):  # only the first and the last stage read data
            try:
                data = [job.check(t, b) for t, b in enumerate(job.batches)]
                if job.num_minibatches is not None and len(data) != job.num_minibatches:
                    raise DataError(
                        f"the batches held {len(data)} mini-batches, but "
                        f"{job.num_minibatches} were announced"
                    )
            except Exception as exc:
                error = exc
        rows = self._startup(job, data, error)
        if not rows:
            return Outcome([], [{} for _ in range(w)], self._gather_reports(runner))
        where = "building the schedule"
        try:
            lowered, plans = job.plan(len(rows))
        except Exception as exc:
            self._fail(exc, where)
        self._check_schedule(lowered.schedule)
        n = job.num_microbatches
        replica = lay.replica
        # with D replicas this rank trains on its part of each mini-batch (section 10)
        micro = [microbatch_rows(part_rows(r, d)[replica], n) for r in rows]
        if data is not None and d > 1:
            data = [replica_part(b, replica, d) for b in data]
        source = SplitBatches(data, n) if data is not None else NoBatches()
        runner.begin(plans[stage], job.base_minibatch)
        if d > 1:
            reduction = DistributedReduction(self.dp_group, lay, runner.params, rows, runner.device)
            runner.combine_grads = reduction.hook()
        elif stage == w - 1:  # one replica: the loss is known here as it is computed
            runner.on_loss = job.on_loss
        lookahead = self.options.lookahead or n + 1
        where = "start-up"
        try:
            transport = make_transport(
                self._links,
                lowered,
                stage,
                micro,
                self.shapes_in,
                self.shapes_out,
                device=runner.device,
                timeout=self.options.timeout,
                lookahead=lookahead,
                ordered=self.info.backend == "nccl",
                ranks=lay.pipeline_ranks(),
                groups=self.p2p_groups,
            )
            self._transport = transport
            transport.pump()
            executor = StageExecutor(lowered.programs[stage], runner, transport, source)
            try:
                executor.run()
                if not executor.done:  # a blocking transport never answers "not yet"
                    raise ScheduleError(f"internal: stage {stage} stopped at {executor.current}")
            finally:
                op = executor.current
                if op is not None:
                    where = f"action {op.action} (program index {op.index} of stage {stage})"
            where = "the end of the run (waiting for the last sends)"
            transport.finish()
        except BaseException as exc:
            self._fail(exc, where)
        finally:
            runner.on_loss = None
            runner.combine_grads = None
            self._transport = None
        return self._finish(job, runner, rows)

    def gather_stages(self, values: list[Any], what: str) -> list[Any]:
        """Every stage's value (replica 0's), from this rank's one."""
        (mine,) = values
        got = self._all_gather(mine, what)
        return [got[r] for r in self.layout.ranks[0]]

    def _gather_reports(self, runner: Any) -> list[Any]:
        return self.gather_stages([runner.report()], "the report exchange")

    def _finish(self, job: Job, runner: Any, rows: list[int]) -> Outcome:
        """Share losses and report figures, so every rank returns and reports the same."""
        mine = {
            "losses": runner.losses if runner.is_last else None,
            "steps": runner.steps,
            "stage": runner.report(),
        }
        where = "the end-of-run exchange"
        got = self._all_gather(mine, where)
        lay = self.layout
        count = len(rows)
        if lay.num_replicas == 1:
            losses_by_t: dict[int, float] = got[-1]["losses"]
            losses = [losses_by_t[t] for t in range(count)]
        else:  # the whole mini-batch's loss, from every replica's last stage in replica order
            last = [got[row[-1]]["losses"] for row in lay.ranks]
            losses = [
                combine_losses([by_t[t] for by_t in last], part_weights(rows[t], lay.num_replicas))
                for t in range(count)
            ]
        if job.on_loss is not None and not (runner.is_last and lay.num_replicas == 1):
            for t in range(count):
                job.on_loss(job.base_minibatch + t, losses[t])
        first = [got[r] for r in lay.ranks[0]]  # replica 0's figures, by stage
        return Outcome(losses, [g["steps"] for g in first], [g["stage"] for g in first])
