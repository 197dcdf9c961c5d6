"""Where the training loop runs: one process for every stage, or one process per stage.

The loop in :mod:`timeprest.train.loop` is written once. What differs between
the engines is asked of a context: which process writes the run directory and
logs, which processes read the data, how a value chosen on one process reaches
the others, and how the held-out data are evaluated on the whole model (by the run's task,
:mod:`timeprest.tasks`).
:class:`LocalContext` answers for the emulator (one process does everything);
:class:`DistributedContext` for a torchrun job (rank r runs stage r, rank 0
writes, the first and the last stage read data, rank 0 evaluates with every
stage's latest weights gathered to it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from torch import nn

from timeprest.errors import ConfigError

if TYPE_CHECKING:
    from timeprest.engine.runtime import DistributedRuntime, RuntimeOptions
    from timeprest.pipeline import Pipeline
    from timeprest.tasks import Metrics, Task

T = TypeVar("T")


def evaluate(
    task: Task, stages: list[nn.Module], test: Any, batch_size: int, device: str
) -> Metrics:
    """The task's held-out metrics of the composed stages (their latest weights)."""
    return task.evaluate(nn.Sequential(*stages), test, batch_size, device)


class RunContext(Protocol):
    """What the loop asks of the process(es) it runs in."""

    rank: int
    world_size: int
    writes: bool
    """This process writes the run directory and the log lines."""
    reads_data: bool
    """This process feeds or checks mini-batches (the first and the last stage)."""
    shows_progress: bool
    """This process learns each loss first (the last stage) and shows the progress bar."""
    model_device: str
    """Where the whole model is built and the split is measured."""

    def on_writer(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on the writing process, its result on every process; errors on all."""
        ...

    def on_readers(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()`` on the processes that read data (the writer first), None elsewhere."""
        ...

    def broadcast(self, value: T | None) -> T:
        """The writing process's ``value`` on every process (the others pass None)."""
        ...

    def barrier(self, what: str) -> None: ...

    def pipeline_options(self, stages: list[nn.Module]) -> dict[str, Any]:
        """The ``stages`` argument and engine options of this context's :class:`Pipeline`."""
        ...

    def evaluate(
        self, pipe: Pipeline, stages: list[nn.Module], task: Task, test: Any, batch_size: int
    ) -> Metrics:
        """The held-out metrics of the whole model with the latest weights, on every process."""
        ...

    def env(self) -> dict[str, Any]:
        """What env.json adds for this context."""
        ...


class LocalContext:
    """The emulator: one process holds every stage, reads the data and writes the run."""

    rank, world_size = 0, 1
    writes = reads_data = shows_progress = True

    def __init__(self, device: str) -> None:
        self.model_device = device

    def on_writer(self, what: str, fn: Callable[[], T]) -> T:
        return fn()

    def on_readers(self, what: str, fn: Callable[[], T]) -> T | None:
        return fn()

    def broadcast(self, value: T | None) -> T:
        return cast(T, value)  # the one process is the writer: its value is set

    def barrier(self, what: str) -> None:
        pass

    def pipeline_options(self, stages: list[nn.Module]) -> dict[str, Any]:
        return {"stages": stages}

    def evaluate(
        self, pipe: Pipeline, stages: list[nn.Module], task: Task, test: Any, batch_size: int
    ) -> Metrics:
        assert test is not None, "the one local process reads the test set"
        return evaluate(task, stages, test, batch_size, self.model_device)

    def env(self) -> dict[str, Any]:
        return {}


class DistributedContext:
    """A torchrun job: rank r runs stage r (with D replicas, rank replica * W + stage);
    control messages go over the runtime's gloo group."""

    def __init__(self, options: RuntimeOptions, num_stages: int, data_parallel: int = 1) -> None:
        from timeprest.engine.runtime import DistributedRuntime, init_distributed

        self.options = options
        info = init_distributed(options)
        self.rank, self.world_size = info.rank, info.world_size
        procs = num_stages * data_parallel
        if self.world_size != procs:
            what = "" if data_parallel == 1 else f" x --data-parallel {data_parallel}"
            raise ConfigError(
                f"--stages {num_stages}{what} but the job has {self.world_size} processes: one "
                f"process per stage (torchrun --nproc-per-node {procs})"
            )
        self.job: DistributedRuntime = DistributedRuntime(options, data_parallel)
        # rank replica * W + stage (docs/design.md section 10): replica 0 is ranks 0..W-1
        self.stage = self.job.layout.stage
        self.writes = self.rank == 0
        self.reads_data = self.stage in (0, num_stages - 1)
        self.shows_progress = self.rank == self.job.layout.ranks[0][-1]
        self.model_device = "cpu"  # the runtime moves each rank's stage to its device
        self._eval_ready = False

    def on_writer(self, what: str, fn: Callable[[], T]) -> T:
        value = self.job.agreed(what, lambda: fn() if self.writes else None)
        return self.broadcast(value)

    def on_readers(self, what: str, fn: Callable[[], T]) -> T | None:
        # the writer first: it may download what the other reader then finds on disk
        value = self.job.agreed(what, lambda: fn() if self.writes else None)
        if self.reads_data and not self.writes:
            return self.job.agreed(what, fn)
        self.job.barrier(what)
        return value

    def broadcast(self, value: T | None) -> T:
        import torch.distributed as dist

        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0, group=self.job.group)
        return cast(T, box[0])

    def barrier(self, what: str) -> None:
        self.job.barrier(what)

    def pipeline_options(self, stages: list[nn.Module]) -> dict[str, Any]:
        return {
            "stages": lambda s: stages[s],
            "engine": "distributed",
            "runtime": self.options,
        }

    def evaluate(
        self, pipe: Pipeline, stages: list[nn.Module], task: Task, test: Any, batch_size: int
    ) -> Metrics:
        import torch.distributed as dist

        device = pipe.runners[0].device
        if self.writes and not self._eval_ready:  # rank 0's copies of the other stages join it
            for s, module in enumerate(stages):
                if s != self.stage:
                    module.to(device)
            self._eval_ready = True
        own = stages[self.stage]
        states: list[Any] | None = [None] * self.world_size if self.writes else None
        dist.gather_object(
            {k: v.cpu() for k, v in own.state_dict().items()}, states, dst=0, group=self.job.group
        )
        result = None
        if self.writes and states is not None and test is not None:
            # replica 0's stages (every replica holds the same weights): evaluated once
            for s, r in enumerate(self.job.layout.ranks[0]):
                if r != self.rank:
                    stages[s].load_state_dict(states[r])
            result = evaluate(task, stages, test, batch_size, str(device))
        return self.broadcast(result)

    def env(self) -> dict[str, Any]:
        return {
            "processes": self.world_size,
            "data_parallel": self.job.layout.num_replicas,
            "transport": self.job.transport,  # what --transport resolved to
        }


def make_context(
    engine: str,
    device: str,
    threads: int | None,
    num_stages: int,
    data_parallel: int = 1,
    transport: str = "auto",
) -> RunContext:
    """The context of a run: local for the emulator, distributed inside a torchrun job."""
    if engine != "distributed":
        return LocalContext(device)
    from timeprest.engine.runtime import RuntimeOptions

    options = RuntimeOptions(
        num_threads=threads or 1,
        backend="nccl" if device == "cuda" else "gloo",
        transport=transport,  # type: ignore[arg-type]  # TrainConfig checked the choice
    )
    return DistributedContext(options, num_stages, data_parallel)
