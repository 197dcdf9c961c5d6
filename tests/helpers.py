"""Small models and data shared by the tests."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def tanh_mlp_stages(num_stages: int = 3, dtype=torch.float64, seed: int = 0, width: int = 8):
    """Linear+Tanh stages ending in a Linear: 4 -> width -> ... -> 2."""
    torch.manual_seed(seed)
    stages: list[nn.Module] = []
    dims = [4] + [width] * (num_stages - 1) + [2]
    for s in range(num_stages):
        lin = nn.Linear(dims[s], dims[s + 1])
        stages.append(lin if s == num_stages - 1 else nn.Sequential(lin, nn.Tanh()))
    return [m.to(dtype) for m in stages]


def regression_batches(num=6, rows=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, 4, generator=g, dtype=dtype),
            torch.randn(rows, 2, generator=g, dtype=dtype),
        )
        for _ in range(num)
    ]


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def plain_sgd(stages, batches, lr=0.1, loss_fn=torch.nn.functional.mse_loss):
    """Single-process mini-batch SGD on the composed stages: the synchronous reference."""
    model = nn.Sequential(*stages)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def alive_tensors(shape: tuple[int, ...]) -> int:
    """Tensors (parameters too) of ``shape`` alive after a full collection: what a
    reference cycle through autograd's C++ side keeps, which no collection frees."""
    import gc

    gc.collect()
    return sum(
        1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter) and o.shape == shape
    )


def flat(stages):
    return torch.cat([p.detach().reshape(-1) for m in stages for p in m.parameters()])


# -- the command line -------------------------------------------------------------------

# a small, quick run: mini-batches of 32 rows of a synthetic set, two stages split by
# parameter count (each test adds its epochs and the rest)
SMALL_RUN = [
    "--dataset",
    "synthetic:train=256,test=128",
    "--model",
    "mlp",
    "--stages",
    "2",
    "--balance",
    "params",
    "--batch-size",
    "32",
    "--no-progress",
]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``timeprest ARGV`` in this process; its exit code, stdout and stderr."""
    import contextlib
    import io

    from timeprest.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, command: str, match: str) -> None:
    """Exit code 2 and one line ``timeprest COMMAND: error: ...`` containing ``match``."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"timeprest {command}: error: ")
    assert match in lines[0], lines[0]


# -- processes ---------------------------------------------------------------------------


def init_group(rank: int, world: int, rdv: str, timeout: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rdv}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )


def spawn(target, world: int, tmp_path: Path, *args: Any, limit: float = 120.0) -> list[int]:
    """Run ``target(rank, world, tmp_dir, *args)`` in ``world`` processes; their exit codes."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=target, args=(r, world, str(tmp_path), *args)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {limit} s"
    return [p.exitcode if p.exitcode is not None else -999 for p in procs]
