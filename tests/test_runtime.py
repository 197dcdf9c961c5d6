"""The distributed runtime: bitwise equal to the emulator, and failing together.

Every test spawns one process per stage (``torch.multiprocessing`` spawn,
gloo, a file rendezvous in ``tmp_path``, one intra-op thread). Process
start-up is the cost, so one job runs many pipelines: the equivalence job of
each W trains every method in float32 and float64 and the parent compares
each with the emulator.
"""

from __future__ import annotations

import os
import signal
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import timeprest
from helpers import init_group, spawn
from timeprest.engine.runtime import (
    RuntimeOptions,
    StageFailure,
)
from timeprest.engine.runtime import group as runtime_module
from timeprest.errors import ConfigError, DataError, TimeprestError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# (name, Pipeline keyword arguments): every method, plus recompute with dropout replay
CASES: list[tuple[str, dict[str, Any]]] = [(m, {"method": m}) for m in timeprest.METHODS] + [
    ("i-timeprest-recompute", {"method": "i-timeprest", "grad_rule": "recompute"})
]
ROWS = (7, 7, 7, 5)  # uneven micro-batches and a short last mini-batch: several message shapes


# -- models and data shared by the workers and the parent -------------------------------


def make_stage(stage: int, num_stages: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(100 + stage)
    dims = [3] + [5] * (num_stages - 1) + [2]
    lin = nn.Linear(dims[stage], dims[stage + 1])
    if stage == num_stages - 1:
        return lin.to(dtype)
    layers: list[nn.Module] = [lin, nn.Tanh()]
    if stage == 0:
        layers.append(nn.Dropout(0.2))  # randomness must replay identically
    return nn.Sequential(*layers).to(dtype)


def make_batches(dtype: torch.dtype, rows: tuple[int, ...] = ROWS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(r, 3, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(r, 2, generator=g, dtype=torch.float64).to(dtype),
        )
        for r in rows
    ]


def pipeline_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    return dict(
        case,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        loss_fn=nn.functional.mse_loss,
    )


def emulate(case: dict[str, Any], world: int, dtype: torch.dtype):
    stages = [make_stage(s, world, dtype) for s in range(world)]
    pipe = timeprest.Pipeline(stages, **pipeline_kwargs(case))
    losses = pipe.train(make_batches(dtype))
    return pipe, losses


# -- spawning ---------------------------------------------------------------------------


# -- equivalence ------------------------------------------------------------------------


def _equivalence_worker(rank: int, world: int, tmp: str) -> None:
    init_group(rank, world, f"{tmp}/rdv")
    out: dict[str, Any] = {}
    opts = RuntimeOptions(timeout=30)
    for name, case in CASES:
        for dname, dtype in DTYPES.items():
            pipe = timeprest.Pipeline(
                lambda s, d=dtype: make_stage(s, world, d),
                engine="distributed",
                runtime=opts,
                **pipeline_kwargs(case),
            )
            # every rank passes the batches; only the first and the last read them
            losses = pipe.train(make_batches(dtype))
            module = pipe.stages[rank]
            assert module is not None
            out[f"{name}/{dname}"] = {
                "losses": losses,
                "state": {k: v.clone() for k, v in module.state_dict().items()},
                "report": pipe.report.to_dict(),
            }
    if world == 2:
        out["errors"] = _agreement_checks(rank, world, opts)
    # the end of the job: the caller destroys its groups, then shutdown() drops the
    # runtime's own group, so no gloo worker outlives the interpreter (SIGABRT at exit)
    assert runtime_module._control is not None
    control = weakref.ref(runtime_module._control[1])
    dist.destroy_process_group()
    runtime_module.shutdown()
    out["control group freed"] = control() is None
    try:
        pipe.train(make_batches(torch.float64))
        out["after shutdown"] = "no error"
    except StageFailure as exc:
        out["after shutdown"] = str(exc)
    torch.save(out, f"{tmp}/rank{rank}.pt")


def _agreement_checks(rank: int, world: int, opts: RuntimeOptions) -> dict[str, str]:
    """Bad set-ups that every rank must reject with the same clear error (no hang)."""
    errors: dict[str, str] = {}
    kw = pipeline_kwargs({"method": "v-timeprest"})

    def attempt(name: str, fn) -> None:
        try:
            fn()
            errors[name] = "no error"
        except TimeprestError as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"

    def pipe(stages=None, **extra) -> timeprest.Pipeline:
        return timeprest.Pipeline(
            stages if stages is not None else lambda s: make_stage(s, world, torch.float64),
            engine="distributed",
            runtime=opts,
            **kw,
            **extra,
        )

    attempt("world", lambda: pipe([make_stage(s, 3, torch.float64) for s in range(3)]))
    attempt("seed", lambda: pipe(seed=rank).train(make_batches(torch.float64)))
    attempt(
        "data",
        lambda: pipe().train(make_batches(torch.float64, rows=(7, 7) if rank == 0 else (7, 7, 7))),
    )
    # the group still works after agreed errors
    attempt("after", lambda: pipe().train(make_batches(torch.float64)))
    return errors


@pytest.mark.parametrize("world", [2, 3, 4])
def test_runtime_matches_emulator_bitwise(world: int, tmp_path: Path) -> None:
    codes = spawn(_equivalence_worker, world, tmp_path, limit=150)
    assert codes == [0] * world
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for name, case in CASES:
        for dname, dtype in DTYPES.items():
            pipe, losses = emulate(case, world, dtype)
            key = f"{name}/{dname}"
            for r in range(world):
                assert got[r][key]["losses"] == losses, (key, r)
                assert got[r][key]["report"] == pipe.report.to_dict(), (key, r)
                want = pipe.stages[r].state_dict()
                have = got[r][key]["state"]
                assert want.keys() == have.keys()
                for k in want:
                    assert torch.equal(want[k], have[k]), (key, r, k)
    if world == 2:
        for r in range(world):
            errors = got[r]["errors"]
            assert "WORLD_SIZE is 2" in errors["world"] and errors["world"].startswith("Config")
            assert errors["seed"].startswith("ConfigError")
            assert "seed: rank 0 0, rank 1 1" in errors["seed"]
            assert errors["data"].startswith("DataError")
            assert "different batches" in errors["data"]
            assert errors["after"] == "no error"
    for r in range(world):
        assert got[r]["control group freed"], r
        assert "job was shut down" in got[r]["after shutdown"], r


# -- failures ---------------------------------------------------------------------------


class _KillOnCall(nn.Module):
    """Kills its own process (no Python exception, no cleanup) on the n-th forward."""

    def __init__(self, inner: nn.Module, n: int, stamp: str) -> None:
        super().__init__()
        self.inner = inner
        self.n = n
        self.stamp = stamp
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            Path(self.stamp).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


class _WidthChange(nn.Module):
    """Returns a narrower output from the second call on: a shape the runtime must reject."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.inner(x)
        return y if self.calls == 1 else y[:, :-1]


def _record(tmp: str, rank: int, name: str, fn, reraise: bool = False) -> None:
    """Run ``fn``; write the error it raises, and when, to ``{name}{rank}.txt``."""
    try:
        fn()
        text = "no error"
    except BaseException as exc:  # the test reads what every rank saw
        text = f"{type(exc).__name__}: {exc}"
        if reraise:
            Path(f"{tmp}/{name}{rank}.txt").write_text(text)
            Path(f"{tmp}/{name}{rank}.time").write_text(repr(time.time()))
            raise
    Path(f"{tmp}/{name}{rank}.txt").write_text(text)
    Path(f"{tmp}/{name}{rank}.time").write_text(repr(time.time()))


def _failure_worker(rank: int, world: int, tmp: str, transport: str) -> None:
    """Three failures in a row, each in a fresh process group: a non-finite loss, a
    shape change and, last, a rank killed outright."""
    opts = RuntimeOptions(timeout=5, transport=transport)

    def pipe(stage_fn, method: str) -> timeprest.Pipeline:
        return timeprest.Pipeline(
            stage_fn, engine="distributed", runtime=opts, **pipeline_kwargs({"method": method})
        )

    def plain(s: int) -> nn.Module:
        return make_stage(s, world, torch.float64)

    # 1. the last stage meets a NaN loss (the targets of mini-batch 2 are NaN)
    init_group(rank, world, f"{tmp}/rdv-nan", timeout=5)
    batches = make_batches(torch.float64)
    batches[2] = (batches[2][0], torch.full_like(batches[2][1], float("nan")))
    _record(tmp, rank, "nan", lambda: pipe(plain, "v-timeprest").train(batches))
    assert not dist.is_initialized()  # the runtime tore the group down

    # 2. stage 1's output shape changes between micro-batches of the same size
    init_group(rank, world, f"{tmp}/rdv-shape", timeout=5)

    def narrowing(s: int) -> nn.Module:
        return _WidthChange(plain(s)) if s == 1 else plain(s)

    shape_batches = make_batches(torch.float64, rows=(6, 6))
    _record(tmp, rank, "shape", lambda: pipe(narrowing, "1f1b").train(shape_batches))

    # 3. stage 1 is killed in the middle of the run
    init_group(rank, world, f"{tmp}/rdv-kill", timeout=5)

    def killed(s: int) -> nn.Module:
        return _KillOnCall(plain(s), 5, f"{tmp}/killed.time") if s == 1 else plain(s)

    kill_batches = make_batches(torch.float64, rows=(4,) * 8)
    # the exception ends the process: its exit code is the one a script would get
    _record(tmp, rank, "kill", lambda: pipe(killed, "pipedream").train(kill_batches), True)


@pytest.mark.parametrize("transport", ["auto", "process-group"])  # auto: shared memory
def test_failures_stop_every_rank_with_one_message(tmp_path: Path, transport: str) -> None:
    world = 3
    codes = spawn(_failure_worker, world, tmp_path, transport, limit=90)
    # the killed rank dies by the signal; the others exit with an error (code 1)
    assert codes == [1, -signal.SIGKILL, 1]

    def seen(name: str, r: int) -> str:
        return (tmp_path / f"{name}{r}.txt").read_text()

    for r in range(world):
        nan, shape = seen("nan", r), seen("shape", r)
        if r == 2:
            assert nan.startswith("NonFiniteLossError"), nan
        else:
            assert nan.startswith("StageFailure"), nan
            assert "rank 2 (stage 2) failed at action F2.0" in nan, nan
            assert "NonFiniteLossError: loss is nan at mini-batch 2" in nan, nan
        if r == 1:
            assert shape.startswith("ShapeError"), shape
        else:
            assert shape.startswith("StageFailure"), shape
            assert "rank 1 (stage 1) failed at action F0.1" in shape, shape
            assert "ShapeError: stage 1's output for micro-batch 0.1" in shape, shape
    killed_at = float((tmp_path / "killed.time").read_text())
    for r in (0, 2):
        kill = seen("kill", r)
        assert kill.startswith("StageFailure"), kill
        assert "rank 1 (stage 1) stopped without reporting an error" in kill, kill
        assert "before it sent the" in kill and "was waiting for it at action" in kill, kill
        # the failure cascades at once, well within the 5 s timeout
        assert float((tmp_path / f"kill{r}.time").read_text()) - killed_at < 4.0


# -- pure parts -------------------------------------------------------------------------


def test_distributed_engine_needs_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        timeprest.Pipeline(
            [make_stage(0, 1, torch.float64)],
            engine="distributed",
            **pipeline_kwargs({"method": "gpipe"}),
        )


def test_runtime_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        RuntimeOptions(timeout=0)
    with pytest.raises(ConfigError, match="num_threads"):
        RuntimeOptions(num_threads=0)
    with pytest.raises(ConfigError, match="backend"):
        RuntimeOptions(backend="mpi")  # type: ignore[arg-type]


def test_errors_are_timeprest_errors() -> None:
    assert issubclass(StageFailure, TimeprestError)
    assert issubclass(DataError, TimeprestError)
