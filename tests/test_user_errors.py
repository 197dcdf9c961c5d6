"""Mistakes a user makes at the command line: one line, exit 2, and nothing saved is lost.

Each case here was a traceback, or a deleted run, before its fix: an ``--overwrite``
that fails its checks, a ``config.json`` some other program wrote, a run dir that
holds the working directory, an output path that is a file, corrupt checkpoint and
record files, a model that does not fit the dataset, a chart file of no known kind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import SMALL_RUN, run_cli
from helpers import assert_one_line_error as one_line_error

BASE = [*SMALL_RUN, "--epochs", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run, copied by every test that changes it."""
    run_dir = tmp_path_factory.mktemp("user-errors") / "run"
    rc, _, err = run_cli("train", *BASE, "--run-dir", str(run_dir))
    assert rc == 0, err
    return run_dir


def contents(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` by relative path, with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# -- --overwrite -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (["--stages", "100", "--microbatches", "2"], "exceeds"),  # refused at the split
        (["--train-limit", "33"], "the last mini-batch of each epoch has 1 rows"),
    ],
)
def test_an_overwrite_that_fails_its_checks_keeps_the_old_run(finished, tmp_path, bad, match):
    run_dir = copy_of(finished, tmp_path)
    before = contents(run_dir)
    rc, _, err = run_cli("train", *BASE, *bad, "--overwrite", "--run-dir", str(run_dir))
    one_line_error(rc, err, "train", match)
    assert contents(run_dir) == before


def test_an_overwrite_replaces_what_the_run_wrote_and_keeps_the_rest(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "old.png").write_bytes(b"from the old run")
    (run_dir / "work").mkdir()
    before_logs = (run_dir / "minibatches.jsonl").read_bytes()
    rc, _, err = run_cli("train", *BASE, "--lr", "0.1", "--overwrite", "--run-dir", str(run_dir))
    assert rc == 0, err
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.1
    assert (run_dir / "minibatches.jsonl").read_bytes() != before_logs
    assert not (run_dir / "plots").exists()  # what timeprest wrote for the old run goes
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "work").is_dir()


def test_overwrite_in_the_folder_it_runs_in_keeps_the_users_files(finished, tmp_path, monkeypatch):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "main.py").write_text("print('mine')\n")
    monkeypatch.chdir(run_dir)
    rc, _, err = run_cli("train", *BASE, "--lr", "0.1", "--overwrite", "--run-dir", ".")
    assert rc == 0, err
    assert (run_dir / "main.py").read_text() == "print('mine')\n"
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.1


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_folder_of_other_files_is_never_written_into(tmp_path, flags):
    mine = tmp_path / "thesis"
    (mine / "docs").mkdir(parents=True)
    (mine / "docs" / "thesis.tex").write_text("mine")
    (mine / "epochs.jsonl").write_text("my own log\n")  # a name a run also writes
    before = contents(mine)
    rc, _, err = run_cli("train", *BASE, *flags, "--run-dir", str(mine))
    one_line_error(rc, err, "train", "exists and is not empty, and holds no timeprest run")
    assert "--overwrite" not in err  # not offered as the way out
    assert contents(mine) == before


def test_a_run_of_an_earlier_version_can_still_be_resumed_and_replaced(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    del config["loss_scale"]  # an identity key later versions added
    (run_dir / "config.json").write_text(json.dumps(config))
    argv = [*BASE, "--run-dir", str(run_dir)]
    rc, _, err = run_cli("train", *argv, "--epochs", "2", "--resume")
    assert rc == 0, err
    rc, _, err = run_cli("train", *argv, "--overwrite")
    assert rc == 0, err


def test_a_resumed_run_keeps_the_split_that_chose_its_stages(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    split = (run_dir / "split.json").read_bytes()
    rc, _, err = run_cli("train", *BASE, "--epochs", "2", "--resume", "--run-dir", str(run_dir))
    assert rc == 0, err
    assert (run_dir / "split.json").read_bytes() == split
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2


def test_compare_refuses_a_foreign_method_folder_before_training_any(tmp_path):
    out = tmp_path / "cmp"
    (out / "v-timeprest").mkdir(parents=True)
    (out / "v-timeprest" / "config.json").write_text(json.dumps({"name": "myapp"}))
    argv = ["compare", *BASE, "--methods", "pipedream,v-timeprest", "--out", str(out)]
    for flags in ([], ["--overwrite"], ["--resume"]):
        rc, _, err = run_cli(*argv, *flags, "--no-plots")
        one_line_error(rc, err, "compare", "no timeprest run wrote: choose another --out")
        assert not (out / "pipedream").exists()
    (out / "v-timeprest" / "config.json").write_text("[1, 2]")
    rc, _, err = run_cli(*argv, "--overwrite", "--no-plots")
    one_line_error(rc, err, "compare", "no timeprest run wrote")


# -- output paths ------------------------------------------------------------------------


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("mine")
    for flags in ([], ["--overwrite"]):
        rc, _, err = run_cli("train", *BASE, *flags, "--run-dir", str(f))
        one_line_error(rc, err, "train", "cannot create run dir")
    assert f.read_text() == "mine"


def test_file_system_errors_of_any_command_are_one_line(finished, tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("mine")
    rc, _, err = run_cli("plot", str(finished), "--out", str(f))
    one_line_error(rc, err, "plot", str(f))
    assert f.read_text() == "mine"


# -- corrupt files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is unreadable (corrupt or cut short?)"),
        (b"\x93\xfe random bytes \x00\x01", "is unreadable (corrupt or cut short?)"),
        (None, "is unreadable (corrupt or cut short?)"),  # the real file, cut to 1000 bytes
    ],
)
def test_a_corrupt_stage_file_is_one_line_and_the_run_keeps_its_record(
    finished, tmp_path, content, match
):
    run_dir = copy_of(finished, tmp_path)
    stage0 = run_dir / "checkpoint" / "stage0.pt"
    stage0.write_bytes(stage0.read_bytes()[:1000] if content is None else content)
    before = contents(run_dir)
    rc, _, err = run_cli("train", *BASE, "--epochs", "2", "--resume", "--run-dir", str(run_dir))
    one_line_error(rc, err, "train", match)
    # config.json and split.json are written only once the checkpoint has loaded
    assert contents(run_dir) == before
    rc, _, err = run_cli("export", str(run_dir), "--out", str(tmp_path / "m.pt"))
    one_line_error(rc, err, "export", match)


def test_swapped_stage_files_are_named_as_such(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    ckpt = run_dir / "checkpoint"
    (ckpt / "stage0.pt").rename(ckpt / "tmp.pt")
    (ckpt / "stage1.pt").rename(ckpt / "stage0.pt")
    (ckpt / "tmp.pt").rename(ckpt / "stage1.pt")
    rc, _, err = run_cli("train", *BASE, "--epochs", "2", "--resume", "--run-dir", str(run_dir))
    one_line_error(rc, err, "train", "holds stage 1, not stage 0")
    rc, _, err = run_cli("export", str(run_dir), "--out", str(tmp_path / "m.pt"))
    one_line_error(rc, err, "export", "holds stage 1, not stage 0")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("config.json", b"\x93\xfe\x00", "config.json is unreadable: not UTF-8 text"),
        ("checkpoint/progress.json", b"\x93\xfe\x00", "progress.json is unreadable: not UTF-8"),
        ("checkpoint/progress.json", b"{}", "progress.json is unreadable: no 'epoch'"),
        ("checkpoint/progress.json", b"[]", "progress.json is unreadable: not a JSON object"),
    ],
)
def test_corrupt_run_records_are_one_line_on_resume(finished, tmp_path, name, content, match):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / name).write_bytes(content)
    rc, _, err = run_cli("train", *BASE, "--epochs", "2", "--resume", "--run-dir", str(run_dir))
    one_line_error(rc, err, "train", match)


def test_a_non_utf8_epoch_log_is_one_line_for_plot(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "epochs.jsonl").write_bytes(b"\x93\xfe\x00")
    rc, _, err = run_cli("plot", str(run_dir), "--out", str(tmp_path / "plots"))
    one_line_error(rc, err, "plot", "epochs.jsonl is unreadable: not UTF-8 text")


def test_a_non_utf8_cost_file_is_one_line(tmp_path):
    f = tmp_path / "costs.json"
    f.write_bytes(b"\x00\x92\xfe")
    rc, _, err = run_cli("simulate", "--cost-file", str(f))
    one_line_error(rc, err, "simulate", "is not UTF-8 text")


# -- options that do not fit -------------------------------------------------------------


def test_gpt_on_an_image_dataset_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    rc, _, err = run_cli(
        "train", "--model", "gpt", "--dataset", "synthetic:train=64,test=32", "--stages", "2",
        "--epochs", "1", "--no-progress", "--run-dir", str(run_dir),
    )  # fmt: skip
    one_line_error(rc, err, "train", "--model gpt is a language model over byte-level text")
    assert not run_dir.exists()  # refused before anything was written
    rc, _, err = run_cli(
        "profile", "--model", "gpt", "--dataset", "synthetic:train=64,test=32", "--stages", "2",
        "--out", str(tmp_path / "p.json"),
    )  # fmt: skip
    one_line_error(rc, err, "profile", "--model gpt is not supported here")


def test_an_unknown_model_is_refused_before_any_process_starts(tmp_path):
    rc, _, err = run_cli(
        "train", *BASE, "--model", "foo", "--engine", "distributed", "--run-dir", str(tmp_path)
    )
    one_line_error(rc, err, "train", "unknown model 'foo'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_profile_on_cuda_without_cuda_is_one_line(tmp_path):
    rc, _, err = run_cli(
        "profile", "--model", "mlp", "--dataset", "synthetic:train=64,test=32", "--stages", "2",
        "--device", "cuda", "--out", str(tmp_path / "p.json"),
    )  # fmt: skip
    one_line_error(rc, err, "profile", "no CUDA device is available")


@pytest.mark.parametrize("name", ["g.jpgx", "chart"])
def test_a_chart_file_of_no_known_kind_is_refused_before_simulating(tmp_path, name):
    pytest.importorskip("matplotlib")
    rc, _, err = run_cli("simulate", "--minibatches", "4", "--png", str(tmp_path / name))
    one_line_error(rc, err, "simulate", "name a chart file of a kind matplotlib draws (.avif")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["g.png", "g.jpg", "g.eps"])
def test_every_chart_kind_matplotlib_draws_is_taken(tmp_path, name):
    pytest.importorskip("matplotlib")
    rc, out, err = run_cli("simulate", "--minibatches", "4", "--png", str(tmp_path / name))
    assert rc == 0, err
    assert (tmp_path / name).stat().st_size > 0 and f"Gantt chart: {tmp_path / name}" in out


@pytest.mark.parametrize("command", ["train", "compare"])
def test_resume_and_overwrite_together_are_refused(command, tmp_path, capsys):
    from timeprest.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--resume", "--overwrite"])
    assert exit_.value.code == 2
    assert "--overwrite: not allowed with argument --resume" in capsys.readouterr().err


def test_profile_makes_the_folder_of_its_cost_file(tmp_path):
    out = tmp_path / "new" / "folder" / "costs.json"
    rc, _, err = run_cli(
        "profile", "--model", "mlp", "--dataset", "synthetic:train=64,test=32", "--stages", "2",
        "--microbatches", "2", "--out", str(out),
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(out.read_text())["stages"]
