"""The process group: initialising it from torchrun's environment, the control group, shutdown.

The runtime talks on two kinds of channel: point-to-point messages between
neighbouring stages (on the default group: gloo on CPU, NCCL on GPUs), and a
gloo *control group* for checks, losses and reports, so that its collectives
never interleave with the stage-to-stage traffic.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import math
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from timeprest.errors import ConfigError

SHUT_DOWN = "shut down"
TRANSPORTS = ("auto", "shm", "process-group")  # RuntimeOptions.transport


@dataclass(frozen=True)
class RuntimeOptions:
    """Settings of the distributed runtime (they need not be equal across ranks)."""

    timeout: float = 120.0
    """Seconds a rank waits for any message or collective before it gives up; also the
    process-group timeout when the runtime initialises the group itself."""
    num_threads: int | None = 1
    """Intra-op threads per process on CPU (``torch.set_num_threads``); None keeps torch's."""
    lookahead: int | None = None
    """Receives posted ahead per incoming channel (the process-group transport; shared
    memory needs none); None means ``num_microbatches + 1``."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Backend when the runtime initialises the process group from torchrun's environment:
    ``auto`` picks NCCL when CUDA is available, else gloo."""
    transport: Literal["auto", "shm", "process-group"] = "auto"
    """How activations and gradients move between neighbouring stages: ``shm`` through
    shared memory with a FIFO doorbell per pair of ranks (no transport threads: cheaper on
    small machines; CPU tensors, every rank on one host), ``process-group`` by
    point-to-point messages of the default group (gloo or NCCL). ``auto`` picks ``shm``
    when it can (gloo, one host, a writable shared-memory directory). Every rank must ask
    for the same."""
    spin: float | None = None
    """Seconds a shared-memory receive keeps reading its FIFO before it sleeps: waking a
    sleeping process costs its sender a wake-up (tens of microseconds on a virtual
    machine) and the receiver as long again. None: 2 ms where every rank has cores of its
    own (ranks on the host x intra-op threads <= the cores this process may use, a cgroup
    quota included), else 0 (a spinning rank would take a core from a computing one)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"runtime timeout must be > 0 seconds, got {self.timeout!r}")
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise ConfigError(
                f"num_threads must be an integer >= 1 or None, got {self.num_threads!r}"
            )
        if self.lookahead is not None and (
            not isinstance(self.lookahead, int) or self.lookahead < 1
        ):
            raise ConfigError(f"lookahead must be an integer >= 1 or None, got {self.lookahead!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"unknown backend {self.backend!r}: expected auto, gloo or nccl")
        if self.spin is not None and not (
            isinstance(self.spin, (int, float))
            and not isinstance(self.spin, bool)
            and 0 <= self.spin < math.inf
        ):
            raise ConfigError(f"spin must be seconds >= 0 or None, got {self.spin!r}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(
                f"unknown transport {self.transport!r}: expected auto, shm or process-group"
            )


# -- the process group -----------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def in_distributed_job() -> bool:
    """True inside torchrun's workers (or wherever a default process group exists)."""
    if dist.is_available() and dist.is_initialized():
        return True
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(options: RuntimeOptions | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment unless one exists.

    Returns this process's rank, the world size and its device (``cuda:LOCAL_RANK``
    with NCCL, else CPU), and applies ``options.num_threads`` on CPU. Call it early
    (before loading data) to learn which stage this process runs.
    """
    opts = options or RuntimeOptions()
    if not dist.is_available():
        raise ConfigError("engine='distributed' needs a PyTorch build with torch.distributed")
    if not dist.is_initialized():
        if not in_distributed_job():
            raise ConfigError(
                "engine='distributed' runs one process per stage: start it with "
                "`torchrun --nproc-per-node W ...`, `timeprest train --engine distributed "
                "--nproc W`, or call torch.distributed.init_process_group first"
            )
        chosen = opts.backend
        if chosen == "auto":
            chosen = "nccl" if torch.cuda.is_available() else "gloo"
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=opts.timeout))
        global _owned_world
        _owned_world = weakref.ref(dist.group.WORLD)
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", str(dist.get_rank())))
    if backend == "nccl":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if opts.num_threads is not None:
            torch.set_num_threads(opts.num_threads)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


# One gloo group for control messages (checks, losses, reports), created once per
# default group: collectives on it never interleave with the stage-to-stage traffic,
# and it works whatever the data backend is.
# The default group is held by weak reference only: the runtime never keeps a
# process group alive past the job's own ``destroy_process_group``.
_control: tuple[weakref.ref[Any], Any] | None = None
_instances = 0  # runtimes created in this process; equal across ranks in a correct program
_runtimes: weakref.WeakSet[Any] = weakref.WeakSet()  # DistributedRuntime objects
_owned_world: weakref.ref[Any] | None = None  # the default group init_distributed created


def control_group(timeout: float) -> Any:
    global _control
    world = dist.group.WORLD
    if _control is None or _control[0]() is not world:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        _control = (weakref.ref(world), group)
        # shut the runtime down at exit, once however many groups a process makes
        atexit.unregister(shutdown)
        atexit.register(shutdown)
    return _control[1]


# The process-group transport's two groups over gloo, one per direction of the
# stage-to-stage traffic: made once per default group, like the control group.
_p2p: tuple[weakref.ref[Any], dict[str, Any]] | None = None


def p2p_groups(timeout: float) -> dict[str, Any]:
    """The gloo groups of the activations and of the gradients (collective the first time)."""
    global _p2p
    world = dist.group.WORLD
    if _p2p is None or _p2p[0]() is not world:
        wait = datetime.timedelta(seconds=timeout)
        groups = {kind: dist.new_group(backend="gloo", timeout=wait) for kind in ("act", "grad")}
        _p2p = (weakref.ref(world), groups)
    return _p2p[1]


def shutdown() -> None:
    """End this process's part of the distributed job cleanly; safe to call twice.

    Drops the runtime's references to its process groups, so that each group is
    destroyed (and its worker threads joined) while the interpreter is still fully
    alive, and destroys the default group if :func:`init_distributed` created it.
    Pipelines of this process cannot communicate afterwards. It runs by itself at
    interpreter exit once a runtime was created: a gloo worker thread still releasing the tensors of the last
    collective when the interpreter finalises aborts the process (SIGABRT).
    """
    global _control, _owned_world, _p2p
    for rt in list(_runtimes):
        if rt.broken is None:
            rt.broken = SHUT_DOWN
        rt.group = None
        rt.p2p_groups = None
    _control = None
    _p2p = None
    owned = _owned_world() if _owned_world is not None else None
    _owned_world = None
    try:
        if owned is not None and dist.is_initialized() and dist.group.WORLD is owned:
            dist.destroy_process_group()
    except Exception:  # already torn down by a failure
        pass
    del owned
    gc.collect()
    # a group the caller keeps (not destroyed) still has its workers: let one that
    # waits for the GIL to release a finished collective's tensors have it now
    time.sleep(0.01)


def register(runtime: Any) -> int:
    """Count a new runtime (shut down with the others at exit); its instance number."""
    global _instances
    _runtimes.add(runtime)
    _instances += 1
    return _instances


def forget_control_group() -> None:
    """Drop the references to the runtime's groups (after a failure tore them down)."""
    global _control, _p2p
    _control = None
    _p2p = None
