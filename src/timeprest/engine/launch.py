"""Starting distributed runs: torchrun on loopback.

Three ways to run ``timeprest train`` with one process per stage::

    torchrun --nproc-per-node 4 -m timeprest train --engine distributed --stages 4 ...
    timeprest train --engine distributed --nproc 4 --stages 4 ...   # starts torchrun itself
    python -c "from timeprest.engine.launch import launch_local; \\
               launch_local(4, ['train', '--engine', 'distributed', '--stages', '4'])"

``launch_local`` runs ``torch.distributed.run`` (torchrun) in standalone mode:
a rendezvous on this machine's loopback at a free port, ``nproc`` workers.
This module only starts processes: ``timeprest train --engine distributed``
outside a torchrun job calls ``launch_local`` to run ``timeprest train``
itself in the workers, and each worker runs the one training loop of
:mod:`timeprest.train.loop` for its stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from timeprest.engine.runtime import StageFailure, in_distributed_job
from timeprest.errors import ConfigError

__all__ = [
    "StageFailure",
    "in_distributed_job",
    "launch_local",
    "torchrun_command",
]


def torchrun_command(
    nproc: int, argv: Sequence[str], *, module: str | None = "timeprest"
) -> list[str]:
    """The torchrun command line that runs ``python -m module argv`` in ``nproc`` processes.

    ``module=None`` runs a script: ``argv[0]`` is its path.
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"the number of processes must be an integer >= 1, got {nproc!r}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on this machine, at a free port
        f"--nproc-per-node={nproc}",
    ]
    if module is not None:
        cmd += ["-m", module]
    return cmd + list(argv)


def launch_local(
    nproc: int,
    argv: Sequence[str],
    *,
    module: str | None = "timeprest",
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> int:
    """Run ``python -m module argv`` as ``nproc`` torchrun workers on loopback; their exit code.

    ``launch_local(4, ["train", "--engine", "distributed", "--stages", "4"])`` is
    ``timeprest train`` with one process per stage. Each worker gets one
    intra-op thread unless ``OMP_NUM_THREADS`` is set. Returns torchrun's exit
    code: 0 when every worker succeeded.
    """
    cmd = torchrun_command(nproc, argv, module=module)
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", "1")
    environment.update(env or {})
    try:
        return subprocess.run(cmd, env=environment, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        return 124
