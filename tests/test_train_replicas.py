"""`timeprest train --data-parallel D`: the run records D, resumes bitwise, and the distributed
run (D x W processes started by torchrun) gives the emulator's numbers."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import SMALL_RUN, assert_one_line_error, run_cli

BASE = [*SMALL_RUN, "--data-parallel", "2", "--threads", "1", "--lr-schedule", "constant"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_epoch_one_is_bitwise_the_uninterrupted_run(tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    rc, _, err = run_cli("train", *BASE, "--epochs", "2", "--run-dir", str(whole))
    assert rc == 0, err
    rc, _, err = run_cli("train", *BASE, "--epochs", "1", "--run-dir", str(cut))
    assert rc == 0, err
    rc, out, err = run_cli("train", *BASE, "--epochs", "2", "--run-dir", str(cut), "--resume")
    assert rc == 0, err
    assert "resumed" in out
    assert jsonl(cut / "minibatches.jsonl") == jsonl(whole / "minibatches.jsonl")
    keys = ("train_loss", "test_loss", "test_accuracy", "peak_versions", "mean_staleness")
    for a, b in zip(jsonl(cut / "epochs.jsonl"), jsonl(whole / "epochs.jsonl"), strict=True):
        assert [a[k] for k in keys] == [b[k] for k in keys]
    assert '"data_parallel": 2' in (whole / "config.json").read_text()
    # one copy per stage in the checkpoint
    assert sorted(p.name for p in (whole / "checkpoint").glob("stage*.pt")) == [
        "stage0.pt",
        "stage1.pt",
    ]


def test_distributed_replicas_match_the_emulator(tmp_path: Path) -> None:
    """``--engine distributed --nproc 4 --data-parallel 2``: torchrun starts 4 workers,
    rank = replica * 2 + stage; the losses and test figures are the emulator's."""
    one = [*BASE, "--epochs", "1", "--train-limit", "128"]
    rc, _, err = run_cli("train", *one, "--run-dir", str(tmp_path / "emulated"))
    assert rc == 0, err
    rc, out, err = run_cli(
        "train", *one, "--engine", "distributed", "--nproc", "4", "--run-dir", str(tmp_path / "d")
    )
    assert rc == 0, err
    assert "starting 4 processes with torchrun" in out
    env = json.loads((tmp_path / "d" / "env.json").read_text())
    assert env["processes"] == 4 and env["data_parallel"] == 2
    got, want = (
        jsonl(tmp_path / "d" / "minibatches.jsonl"),
        jsonl(tmp_path / "emulated" / "minibatches.jsonl"),
    )
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    keys = ("train_loss", "test_loss", "test_accuracy", "peak_versions")
    (e_got,), (e_want,) = (
        jsonl(tmp_path / "d" / "epochs.jsonl"),
        jsonl(tmp_path / "emulated" / "epochs.jsonl"),
    )
    assert [e_got[k] for k in keys] == [e_want[k] for k in keys]


def test_bad_replica_counts_are_one_line(tmp_path: Path) -> None:
    rd = ["--run-dir", str(tmp_path / "run"), "--epochs", "1"]
    rc, _, err = run_cli("train", *BASE, "--engine", "distributed", "--nproc", "2", *rd)
    assert_one_line_error(rc, err, "train", "--nproc 2 must equal --stages 2 x --data-parallel 2")
    rc, _, err = run_cli("train", *SMALL_RUN, "--data-parallel", "0", *rd)
    assert_one_line_error(rc, err, "train", "--data-parallel must be an integer >= 1")
    rc, _, err = run_cli("train", *SMALL_RUN, "--data-parallel", "8", "--microbatches", "8", *rd)
    assert_one_line_error(rc, err, "train", "smaller than --data-parallel 8 x --microbatches 8")
