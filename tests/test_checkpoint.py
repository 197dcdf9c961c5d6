"""Checkpoints: one format for both engines; a resumed run ends bitwise where an
uninterrupted one does (emulator, runtime, and across the two)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import timeprest
from helpers import init_group, spawn
from timeprest.checkpoint import read_manifest
from timeprest.engine.launch import launch_local, torchrun_command
from timeprest.engine.runtime import RuntimeOptions
from timeprest.errors import ConfigError, NonFiniteLossError

W = 2


def make_stage(stage: int, num_stages: int = W, init: int = 0) -> nn.Module:
    torch.manual_seed(1000 * init + stage)
    dims = [3] + [6] * (num_stages - 1) + [2]
    lin = nn.Linear(dims[stage], dims[stage + 1]).double()
    if stage == num_stages - 1:
        return lin
    return nn.Sequential(lin, nn.Tanh(), nn.Dropout(0.25))


def epoch(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch ``k``'s batches (uneven micro-batches, a short last batch)."""
    g = torch.Generator().manual_seed(k)
    return [
        (
            torch.randn(r, 3, generator=g, dtype=torch.float64),
            torch.randn(r, 2, generator=g, dtype=torch.float64),
        )
        for r in (6, 6, 5)
    ]


def kwargs(method: str) -> dict[str, Any]:
    # Adam and SGD momentum carry optimizer state; lr_lambda depends on the cursor
    opt = (
        (lambda p: torch.optim.Adam(p, lr=0.01))
        if method == "pipedream-2bw"
        else (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    )
    return {
        "method": method,
        "optimizer": opt,
        "loss_fn": nn.functional.mse_loss,
        "lr_lambda": lambda t: 1.0 / (1 + t),
    }


def emulator(method: str, init: int = 0) -> timeprest.Pipeline:
    return timeprest.Pipeline([make_stage(s, W, init) for s in range(W)], **kwargs(method))


def distributed(method: str, init: int = 0) -> timeprest.Pipeline:
    return timeprest.Pipeline(
        lambda s: make_stage(s, W, init),
        engine="distributed",
        runtime=RuntimeOptions(timeout=30),
        **kwargs(method),
    )


def full_state(pipe: timeprest.Pipeline) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in pipe.runners:
        out[f"module{r.index}"] = {k: v.clone() for k, v in r.module.state_dict().items()}
        out[f"optimizer{r.index}"] = r.optimizer.state_dict() if r.optimizer else None
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


RESUME_METHODS = ["i-timeprest", "pipedream-2bw", "timeprest", "1f1b"]


def uninterrupted(method: str) -> tuple[list[float], dict[str, Any]]:
    pipe = emulator(method)
    pipe.train(epoch(1))
    losses = pipe.train(epoch(2))
    return losses, full_state(pipe)


# -- emulator -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_emulator_resume_is_bitwise(method: str, tmp_path: Path) -> None:
    want_losses, want_state = uninterrupted(method)
    first = emulator(method)
    first.train(epoch(1))
    torch.manual_seed(123)
    first.save_checkpoint(tmp_path)
    after_save = torch.rand(4)
    # a new process would start from other weights and another RNG state
    torch.manual_seed(999)
    resumed = emulator(method, init=7)
    resumed.load_checkpoint(tmp_path)
    assert torch.equal(torch.rand(4), after_save)  # the RNG state came back
    assert resumed.minibatches_done == 3 and resumed.version(0) == resumed.version(1) == 3
    assert resumed.train(epoch(2)) == want_losses
    assert_same(full_state(resumed), want_state)


def test_checkpoint_files(tmp_path: Path) -> None:
    pipe = emulator("v-timeprest")
    pipe.train(epoch(1))
    out = pipe.save_checkpoint(tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "stage0.pt", "stage1.pt"]
    manifest = read_manifest(out)
    assert manifest["minibatches_done"] == 3 and manifest["num_stages"] == W
    assert manifest["config"]["method"] == "v-timeprest" and "engine" not in manifest["config"]
    for s in range(W):
        state = torch.load(out / f"stage{s}.pt", weights_only=True)  # no pickled code
        assert state["stage"] == s and state["updates"] == 3 and state["minibatches_done"] == 3
        assert set(state["module"]) == set(pipe.runners[s].module.state_dict())
        assert set(state["rng"]) == {"torch", "cuda", "python"}
    # saving again replaces the files in place
    pipe.train(epoch(2))
    pipe.save_checkpoint(out)
    assert read_manifest(out)["minibatches_done"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "stage0.pt", "stage1.pt"]


def test_checkpoint_mismatches_are_clear(tmp_path: Path) -> None:
    pipe = emulator("v-timeprest")
    pipe.train(epoch(1))
    pipe.save_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="method: checkpoint 'v-timeprest', pipeline 'pipedream'"):
        emulator("pipedream").load_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="manifest.json is missing"):
        emulator("v-timeprest").load_checkpoint(tmp_path / "nowhere")
    # a stage file from another save (cut off mid-save) is detected
    stale = torch.load(tmp_path / "stage1.pt", weights_only=True)
    stale["minibatches_done"] = 0
    torch.save(stale, tmp_path / "stage1.pt")
    with pytest.raises(ConfigError, match="cut off while being written"):
        emulator("v-timeprest").load_checkpoint(tmp_path)
    # a different model does not fit
    wide = timeprest.Pipeline(
        [nn.Linear(3, 6).double(), nn.Linear(6, 2).double()], **kwargs("v-timeprest")
    )
    pipe.save_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="does not fit stage 0"):
        wide.load_checkpoint(tmp_path)


def test_no_checkpoint_of_a_failed_run(tmp_path: Path) -> None:
    pipe = emulator("v-timeprest")
    bad = epoch(1)
    bad[1] = (bad[1][0], torch.full_like(bad[1][1], float("nan")))
    with pytest.raises(NonFiniteLossError):
        pipe.train(bad)
    with pytest.raises(ConfigError, match="only a drained pipeline"):
        pipe.save_checkpoint(tmp_path)


def test_torchrun_command() -> None:
    cmd = torchrun_command(3, ["train", "--engine", "distributed"])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        "-m",
        "timeprest",
        "train",
        "--engine",
        "distributed",
    ]
    with pytest.raises(ConfigError):
        torchrun_command(0, [])


# -- runtime --------------------------------------------------------------------------------


def _first_half_worker(rank: int, world: int, tmp: str) -> None:
    """Epoch 1 then a checkpoint per method; and epoch 2 from the emulator's checkpoints."""
    init_group(rank, world, f"{tmp}/rdv")
    out: dict[str, Any] = {}
    for method in RESUME_METHODS:
        pipe = distributed(method)
        pipe.train(epoch(1))
        pipe.save_checkpoint(f"{tmp}/runtime-{method}")
        other = distributed(method, init=7)
        other.load_checkpoint(f"{tmp}/emulator-{method}")
        out[method] = {"losses": other.train(epoch(2)), "state": full_state(other)}
    torch.save(out, f"{tmp}/from-emulator{rank}.pt")
    dist.destroy_process_group()


def resume_main(tmp: str) -> None:
    """Under torchrun (a new job): resume every method from the runtime's checkpoints."""
    out: dict[str, Any] = {}
    for method in RESUME_METHODS:
        pipe = distributed(method, init=7)
        pipe.load_checkpoint(f"{tmp}/runtime-{method}")
        out[method] = {"losses": pipe.train(epoch(2)), "state": full_state(pipe)}
    torch.save(out, f"{tmp}/resumed{dist.get_rank()}.pt")
    assert torch.get_num_threads() == 1
    dist.destroy_process_group()


def test_runtime_resume_is_bitwise(tmp_path: Path) -> None:
    for method in RESUME_METHODS:
        pipe = emulator(method)
        pipe.train(epoch(1))
        pipe.save_checkpoint(tmp_path / f"emulator-{method}")
    # job 1: epoch 1 and a checkpoint, then the process group ends (the interruption)
    assert spawn(_first_half_worker, W, tmp_path, limit=120) == [0] * W
    # job 2: a fresh torchrun job resumes from those checkpoints
    script = tmp_path / "resume.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_checkpoint\n"
        f"test_checkpoint.resume_main({str(tmp_path)!r})\n"
    )
    assert launch_local(W, [str(script)], module=None, timeout=150) == 0
    for method in RESUME_METHODS:
        want_losses, want_state = uninterrupted(method)
        for r in range(W):
            for name in ("resumed", "from-emulator"):
                got = torch.load(tmp_path / f"{name}{r}.pt", weights_only=False)[method]
                assert got["losses"] == want_losses, (method, name, r)
                for key, value in got["state"].items():
                    assert_same(value, want_state[key], f"{method}/{name}/{key}")
        # and the runtime's checkpoint resumes in the emulator
        pipe = emulator(method, init=7)
        pipe.load_checkpoint(tmp_path / f"runtime-{method}")
        assert pipe.train(epoch(2)) == want_losses
        assert_same(full_state(pipe), want_state)
        manifest = json.loads((tmp_path / f"runtime-{method}" / "manifest.json").read_text())
        assert manifest["minibatches_done"] == 3


def test_train_command_distributed_resume_matches_emulator(tmp_path: Path) -> None:
    """``timeprest train --engine distributed`` through ``launch_local``: one epoch, then
    ``--resume`` for the second, equal to the emulator's uninterrupted two epochs."""
    from timeprest.cli import main

    common = [
        "train",
        "--stages=2",
        "--dataset=synthetic:train=160,test=40",
        "--model=mlp",
        "--balance=3,3",
        "--method=i-timeprest",
        "--batch-size=32",
        "--lr-schedule=constant",
        "--threads=1",
        "--no-progress",
    ]
    assert main([*common, "--epochs=2", f"--run-dir={tmp_path / 'emulated'}"]) == 0
    run = [*common, "--engine=distributed", f"--run-dir={tmp_path / 'distributed'}"]
    assert launch_local(W, [*run, "--epochs=1"], timeout=150) == 0
    assert launch_local(W, [*run, "--epochs=2", "--resume"], timeout=150) == 0

    def lines(name: str, file: str) -> list[dict[str, Any]]:
        text = (tmp_path / name / file).read_text()
        return [json.loads(ln) for ln in text.splitlines()]

    want, got = lines("emulated", "minibatches.jsonl"), lines("distributed", "minibatches.jsonl")
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    assert [m["staleness"] for m in got] == [m["staleness"] for m in want]
    keys = ("train_loss", "test_loss", "test_accuracy", "peak_versions")
    want_e, got_e = lines("emulated", "epochs.jsonl"), lines("distributed", "epochs.jsonl")
    assert [[e[k] for k in keys] for e in got_e] == [[e[k] for k in keys] for e in want_e]
