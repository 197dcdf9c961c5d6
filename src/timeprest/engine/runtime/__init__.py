"""The distributed runtime: one process per stage over ``torch.distributed``.

Launch (see ``docs/runtime.md``)::

    # one node, 4 processes (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 4 -m timeprest train --engine distributed ...
    # the same, torchrun started for you on loopback
    timeprest train --engine distributed --nproc 4 ...
    # two nodes of 2 processes each
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m timeprest train --engine distributed ...

In a script::

    pipe = timeprest.Pipeline(stage_fn, method="v-timeprest", num_microbatches=4,
                              optimizer=..., loss_fn=..., engine="distributed")
    losses = pipe.train(batches)   # same list on every rank

The pieces: :mod:`.group` (the process group, the control group, shutdown),
:mod:`.messages` (each rank's traffic, read off the lowered programs),
:mod:`.wire` (activation headers), :mod:`.p2p` (the process group's transport),
:mod:`.shm` and :mod:`.shm_links` (the same-host shared-memory transport),
:mod:`.failures` (the failure protocol) and :mod:`.distributed` (the engine).
Nothing waits longer than ``RuntimeOptions.timeout``.
"""

from timeprest.engine.runtime.distributed import DistributedRuntime, fingerprint
from timeprest.engine.runtime.group import (
    DistInfo,
    RuntimeOptions,
    in_distributed_job,
    init_distributed,
    shutdown,
)
from timeprest.engine.runtime.messages import MessagePlan, plan_messages, stage_events
from timeprest.engine.runtime.p2p import P2PTransport
from timeprest.engine.runtime.shm import ShmTransport
from timeprest.errors import StageFailure
from timeprest.stage.io import microbatch_rows

__all__ = [
    "DistInfo",
    "DistributedRuntime",
    "MessagePlan",
    "P2PTransport",
    "RuntimeOptions",
    "ShmTransport",
    "StageFailure",
    "fingerprint",
    "in_distributed_job",
    "init_distributed",
    "microbatch_rows",
    "plan_messages",
    "shutdown",
    "stage_events",
]
