"""The distributed engine: one process per stage over ``torch.distributed``.

Rank ``r`` runs stage ``r``: the same lowered program and the same
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
    register,
)
from timeprest.engine.runtime.p2p import P2PTransport
from timeprest.engine.runtime.wire import Spec
from timeprest.errors import ConfigError, DataError, ScheduleError, StageFailure
from timeprest.schedule.builders import Schedule
from timeprest.stage import Minibatch, NoBatches, SplitBatches, microbatch_rows

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

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        self.options = options or RuntimeOptions()
        self.info = init_distributed(self.options)
        self.rank = self.info.rank
        self.world_size = self.info.world_size
        self.group: Any = control_group(self.options.timeout)
        self.instance = register(self)
        store = dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"timeprest/{self.instance}/", store)
        self.broken: str | None = None
        # activation (shape, dtype) per micro-batch size into and out of this stage,
        # agreed by headers and kept for the pipeline's life
        self.shapes_in: dict[int, Spec] = {}
        self.shapes_out: dict[int, Spec] = {}
        self._transport: P2PTransport | None = None

    # -- agreement -----------------------------------------------------------------
    def _all_gather(self, obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:
            raise CommError(None, what, exc) from exc
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
        try:
            errors = self._all_gather(None if error is None else first_line(error), what)
        except CommError as exc:
            self._fail(exc, what)
        if error is not None:
            raise error
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            raise ConfigError(
                f"{what} failed on " + "; ".join(f"{stage_name(r)}: {e}" for r, e in bad)
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
                w = num_stages if num_stages is not None else self.world_size
            elif isinstance(stages, Sequence):
                w = len(stages)
                if num_stages is not None and num_stages != w:
                    raise ConfigError(f"num_stages={num_stages} but {w} stages were given")
            else:
                raise ConfigError("stages must be a list of nn.Module or a callable stage_fn")
            if w != self.world_size:
                raise ConfigError(
                    f"engine='distributed' runs one stage per process: the pipeline has {w} "
                    f"stages but WORLD_SIZE is {self.world_size}; launch "
                    f"`torchrun --nproc-per-node {w}` (or give {self.world_size} stages)"
                )
            module = stages(self.rank) if callable(stages) else stages[self.rank]
            if not isinstance(module, nn.Module):
                raise ConfigError(
                    f"stage {self.rank} is a {type(module).__name__}, not an nn.Module "
                    f"(rank {self.rank} runs stage {self.rank})"
                )
            device = self.info.device
            if device.type == "cuda":
                module.to(device)
            else:
                for p in [*module.parameters(), *module.buffers()]:
                    if p.device.type != "cpu":
                        raise ConfigError(
                            f"stage {self.rank} has tensors on {p.device}, but the process "
                            f"group's backend is {self.info.backend}: use NCCL for GPUs"
                        )
            out: list[nn.Module | None] = [None] * w
            out[self.rank] = module
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
            diagnose(read_records(self.store, self.world_size), record)
            if isinstance(exc, CommError)
            else f"{stage_name(self.rank)} failed at {where}: {record['error']}"
        )
        self.broken = message
        self._teardown()
        print(f"[timeprest {stage_name(self.rank)}] {message}", file=sys.stderr, flush=True)
        if isinstance(exc, CommError):
            raise StageFailure(message) from None
        raise exc

    # -- a run -----------------------------------------------------------------------------
    def _startup(
        self, job: Job, data: list[Minibatch] | None, error: BaseException | None
    ) -> list[int]:
        """Agree on the batches and the configuration; raise the same error on every rank."""
        w = self.world_size
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
        try:
            got = self._all_gather(mine, "the start-up exchange")
        except CommError as exc:
            self._fail(exc, "the start-up exchange")
        if error is not None:
            raise error
        bad = [(r, g["error"]) for r, g in enumerate(got) if g["error"] is not None]
        if bad:
            raise ConfigError(
                "the batches were rejected on " + "; ".join(f"{stage_name(r)}: {e}" for r, e in bad)
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
        first, last = got[0]["rows"], got[w - 1]["rows"]
        if first != last:
            raise DataError(
                f"stage 0 and stage {w - 1} read different batches: stage 0 got "
                f"{len(first)} mini-batches of {first[:8]}{'...' if len(first) > 8 else ''} rows, "
                f"stage {w - 1} got {len(last)} of {last[:8]}{'...' if len(last) > 8 else ''}"
            )
        return list(first)

    def _check_schedule(self, schedule: Schedule) -> None:
        text = fingerprint({"programs": schedule.to_text(), "kind": schedule.kind})
        try:
            got = self._all_gather(text, "the schedule check")
        except CommError as exc:
            self._fail(exc, "the schedule check")
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
        w, rank = self.world_size, self.rank
        data: list[Minibatch] | None = None
        error: BaseException | None = None
        if rank in (0, w - 1):  # only the first and the last stage read data
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
        micro = [microbatch_rows(r, n) for r in rows]
        source = SplitBatches(data, n) if data is not None else NoBatches()
        runner.begin(plans[rank], job.base_minibatch)
        if rank == w - 1:
            runner.on_loss = job.on_loss
        lookahead = self.options.lookahead or n + 1
        where = "start-up"
        try:
            transport = P2PTransport(
                lowered,
                rank,
                micro,
                self.shapes_in,
                self.shapes_out,
                device=runner.device,
                timeout=self.options.timeout,
                lookahead=lookahead,
                ordered=self.info.backend == "nccl",
            )
            self._transport = transport
            transport.pump()
            executor = StageExecutor(lowered.programs[rank], runner, transport, source)
            try:
                executor.run()
            finally:
                op = executor.current
                if op is not None:
                    where = f"action {op.action} (program index {op.index} of stage {rank})"
            where = "the end of the run (waiting for the last sends)"
            transport.finish()
        except BaseException as exc:
            self._fail(exc, where)
        finally:
            runner.on_loss = None
            self._transport = None
        return self._finish(job, runner, len(rows))

    def _gather_reports(self, runner: Any) -> list[Any]:
        where = "the report exchange"
        try:
            return self._all_gather(runner.report(), where)
        except CommError as exc:
            self._fail(exc, where)

    def _finish(self, job: Job, runner: Any, count: int) -> Outcome:
        """Share losses and report figures, so every rank returns and reports the same."""
        mine = {
            "losses": runner.losses if runner.is_last else None,
            "steps": runner.steps,
            "stage": runner.report(),
        }
        where = "the end-of-run exchange"
        try:
            got = self._all_gather(mine, where)
        except CommError as exc:
            self._fail(exc, where)
        losses_by_t: dict[int, float] = got[-1]["losses"]
        losses = [losses_by_t[t] for t in range(count)]
        if job.on_loss is not None and not runner.is_last:
            for t in range(count):
                job.on_loss(job.base_minibatch + t, losses[t])
        return Outcome(losses, [g["steps"] for g in got], [g["stage"] for g in got])
