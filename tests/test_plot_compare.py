"""`timeprest plot` and `timeprest compare`: figures, the results table, reuse of finished runs."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from helpers import SMALL_RUN, assert_one_line_error, run_cli
from timeprest import compare as compare_mod
from timeprest.compare import parse_methods
from timeprest.errors import ConfigError
from timeprest.plots import PLOT_FILES, load_runs, run_label
from timeprest.train import TrainConfig

BASE = [*SMALL_RUN, "--epochs", "2", "--target-accuracy", "0.3"]
METHODS = "pipedream,v-timeprest,i-timeprest@0.5"
RUNS = ("pipedream", "v-timeprest", "i-timeprest@0.5")


def assert_png(path: Path, min_width: int = 400) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, (path, len(data))  # axes, labels and lines, not a blank canvas
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert width >= min_width and height >= 200


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, str]:
    """Three methods, two epochs each, compared once for the whole module."""
    out = tmp_path_factory.mktemp("compare") / "out"
    rc, stdout, err = run_cli("compare", "--methods", METHODS, *BASE, "--out", str(out))
    assert rc == 0, err
    return out, stdout


@pytest.fixture
def out_copy(compared, tmp_path) -> Path:
    """A private copy of the compared runs, for tests that run compare again on it."""
    dest = tmp_path / "out"
    shutil.copytree(compared[0], dest)
    return dest


def test_compare_writes_runs_table_and_plots(compared):
    out, stdout = compared
    for i, name in enumerate(RUNS, start=1):
        assert f"[{i}/3] {name}: training" in stdout
        assert (out / name / "summary.json").is_file()
    results = (out / "results.md").read_text()
    lines = results.splitlines()
    header = next(ln for ln in lines if ln.startswith("| method"))
    assert "epochs to 30%" in header and "peak weight bytes / stage" in header
    assert "mean staleness / stage" in header and "time / epoch" in header
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| pipedream",
        "| v-timeprest",
        "| i-timeprest λ=0.5",
    ]
    for name in PLOT_FILES:
        assert f"(plots/{name})" in results
        assert_png(out / "plots" / name)

    table = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in table] == list(RUNS)
    by = {r["method"]: r for r in table}
    # pipedream keeps its own N = 1; the others take N = W
    assert by["pipedream"]["microbatches"] == 1
    assert by["v-timeprest"]["microbatches"] == 2
    assert by["i-timeprest@0.5"]["decay"] == 0.5
    for r in table:
        assert r["epochs"] == 2 and r["action"] == "train"
        assert r["epochs_to_target"] in (1, 2)  # 30% is well within reach
        assert len(r["peak_weight_bytes"]) == 2 and r["mean_epoch_time"] > 0
    # stashing holds more weight versions at stage 0 than the staleness-free method
    assert by["pipedream"]["peak_versions"][0] > by["v-timeprest"]["peak_versions"][0] == 1

    # same data, split and settings in every run; only method and lambda differ
    configs = {n: json.loads((out / n / "config.json").read_text()) for n in RUNS}
    splits = {n: json.loads((out / n / "split.json").read_text())["layer_counts"] for n in RUNS}
    assert len({json.dumps(s) for s in splits.values()}) == 1
    for key in ("dataset", "seed", "batch_size", "lr", "epochs", "balance", "stages"):
        assert len({json.dumps(c[key]) for c in configs.values()}) == 1, key
    assert configs["i-timeprest@0.5"]["decay"] == 0.5


def test_compare_reuses_finished_runs(out_copy):
    before = tree(out_copy)
    # --no-plots: drawing is slow on a loaded machine and tested elsewhere
    argv = ["compare", "--methods", METHODS, *BASE, "--no-plots"]
    rc, stdout, err = run_cli(*argv, "--out", str(out_copy))
    assert rc == 0, err
    for i, name in enumerate(RUNS, start=1):
        assert f"[{i}/3] {name}: reusing the finished run in {out_copy / name}" in stdout
    assert "training" not in stdout
    after = tree(out_copy)
    for key, data in before.items():
        if key.startswith(RUNS):
            assert after[key] == data, key  # run directories untouched
    assert "(reused)" in (out_copy / "results.md").read_text()


def test_compare_refuses_other_settings(out_copy):
    before = tree(out_copy)
    rc, _, err = run_cli(
        "compare", "--methods", METHODS, *BASE, "--lr", "0.1", "--out", str(out_copy)
    )
    assert_one_line_error(rc, err, "compare", "pipedream already holds a different run (lr=0.001")
    assert "--overwrite" in err
    # more epochs of the same run: resumable
    rc, _, err = run_cli(
        "compare", "--methods", METHODS, *BASE, "--epochs", "3", "--out", str(out_copy)
    )
    assert_one_line_error(rc, err, "compare", "already holds a run with epochs=2 (now 3)")
    assert "--resume" in err
    assert tree(out_copy) == before  # nothing ran, nothing was rewritten


def test_compare_resume_reuses_and_starts_missing_methods(out_copy):
    rc, stdout, err = run_cli(
        "compare",
        "--methods",
        "pipedream,gpipe",
        *BASE,
        "--resume",
        "--no-plots",
        "--out",
        str(out_copy),
    )
    assert rc == 0, err
    assert "[1/2] pipedream: reusing" in stdout and "[2/2] gpipe: training" in stdout
    rows = [json.loads(ln) for ln in (out_copy / "gpipe" / "epochs.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    table = json.loads((out_copy / "results.json").read_text())
    assert [r["method"] for r in table] == ["pipedream", "gpipe"]


def test_compare_resume_continues_runs_to_more_epochs(out_copy):
    argv = ["compare", "--methods", "pipedream", *BASE, "--epochs", "3", "--resume", "--no-plots"]
    rc, stdout, err = run_cli(*argv, "--out", str(out_copy))
    assert rc == 0, err
    assert "[1/1] pipedream: resuming" in stdout
    table = json.loads((out_copy / "results.json").read_text())
    assert table[0]["epochs"] == 3 and table[0]["action"] == "resume"


def test_compare_without_matplotlib_still_writes_the_table(out_copy, monkeypatch):
    shutil.rmtree(out_copy / "plots")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    rc, stdout, err = run_cli("compare", "--methods", METHODS, *BASE, "--out", str(out_copy))
    assert rc == 0, err
    assert "pip install timeprest[plot]" in stdout
    assert "![" not in (out_copy / "results.md").read_text()
    assert not (out_copy / "plots").exists()


def test_compare_records_a_diverged_method(tmp_path):
    out = tmp_path / "out"
    argv = [
        "compare",
        "--methods",
        "v-timeprest,gpipe",
        *BASE,
        "--optimizer",
        "sgd",
        "--lr",
        "1e4",
        "--epochs",
        "1",
    ]
    rc, stdout, err = run_cli(*argv, "--out", str(out))
    assert rc == 0, err  # divergence is a result, not an error of the command
    assert "v-timeprest diverged: loss is" in stdout and "[2/2] gpipe: training" in stdout
    results = (out / "results.md").read_text()
    assert "| v-timeprest | 2 | diverged | – |" in results
    assert "Training stopped early:" in results and "- v-timeprest: loss is" in results
    table = json.loads((out / "results.json").read_text())
    assert table[0]["failure"].startswith("loss is") and table[0]["final_test_accuracy"] is None
    assert not (out / "plots").exists()  # no run finished an epoch: nothing to draw
    rc, _, err = run_cli("plot", str(out))
    assert_one_line_error(rc, err, "plot", "has no finished epoch yet")


def test_plot_of_a_compare_dir_skips_runs_without_epochs(compared, tmp_path):
    shutil.copytree(compared[0] / "pipedream", tmp_path / "pipedream")
    (tmp_path / "gpipe").mkdir()  # diverged in its first epoch: config, no epoch rows
    shutil.copy(compared[0] / "v-timeprest" / "config.json", tmp_path / "gpipe")
    assert [r.path.name for r in load_runs([tmp_path])] == ["pipedream"]


@pytest.mark.parametrize(
    "methods,match",
    [
        ("pipedream,nope", "unknown method 'nope'"),
        ("v-timeprest@0.5", "λ only acts on an intermediate backward"),
        ("i-timeprest@fast", "bad λ in 'i-timeprest@fast'"),
        ("i-timeprest@-1", "must be a finite number >= 0"),
        ("gpipe,gpipe", "lists 'gpipe' twice"),
        (",", "--methods is empty"),
    ],
)
def test_compare_bad_methods(methods, match, tmp_path):
    rc, _, err = run_cli("compare", "--methods", methods, *BASE, "--out", str(tmp_path / "out"))
    assert_one_line_error(rc, err, "compare", match)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_compare_bad_training_flag_fails_before_any_run(tmp_path):
    argv = ["compare", "--methods", "pipedream,gpipe", *BASE, "--batch-size", "0"]
    rc, _, err = run_cli(*argv, "--out", str(tmp_path / "out"))
    assert_one_line_error(rc, err, "compare", "--batch-size must be an integer >= 1")
    assert not (tmp_path / "out").exists()


def test_time_split_is_measured_once_and_kept(tmp_path, monkeypatch):
    base = TrainConfig(
        dataset="synthetic:train=64,test=32", model="mlp", stages=2, batch_size=16, balance="time"
    )
    logs: list[str] = []
    counts, record = compare_mod.fixed_time_split(base, tmp_path, overwrite=False, log=logs.append)
    assert sum(int(c) for c in counts.split(",")) == 6 and len(counts.split(",")) == 2
    assert record is not None and ",".join(map(str, record["layer_counts"])) == counts
    (tmp_path / "split.json").write_text(json.dumps(record))

    def measure_again(cfg):
        raise AssertionError("the saved split should have been used")

    monkeypatch.setattr(compare_mod, "_measure_split", measure_again)
    again = compare_mod.fixed_time_split(base, tmp_path, overwrite=False, log=logs.append)
    assert again == (counts, None)
    assert "measured earlier" in logs[-1]
    # other settings, or --overwrite: measured anew
    monkeypatch.setattr(compare_mod, "_measure_split", lambda cfg: [1, 5])
    other = TrainConfig(**{**base.to_dict(), "batch_size": 8})
    assert (
        compare_mod.fixed_time_split(other, tmp_path, overwrite=False, log=logs.append)[0] == "1,5"
    )
    assert compare_mod.fixed_time_split(base, tmp_path, overwrite=True, log=logs.append)[0] == "1,5"


def test_compare_time_split_is_shared_and_saved(tmp_path, monkeypatch):
    """--balance time: one measured split for every method, saved only when the runs start."""
    monkeypatch.setattr(compare_mod, "_measure_split", lambda cfg: [3, 3])
    argv = [*BASE, "--balance", "time", "--epochs", "1", "--no-plots"]
    out = tmp_path / "out"
    rc, stdout, err = run_cli("compare", "--methods", "v-timeprest,gpipe", *argv, "--out", str(out))
    assert rc == 0, err
    assert "split: layer counts 3,3" in stdout
    for name in ("v-timeprest", "gpipe"):
        assert json.loads((out / name / "split.json").read_text())["layer_counts"] == [3, 3]
    assert json.loads((out / "split.json").read_text())["layer_counts"] == [3, 3]
    # a refused command (another batch size) measures again but keeps the saved split
    monkeypatch.setattr(compare_mod, "_measure_split", lambda cfg: [2, 4])
    before = (out / "split.json").read_text()
    rc, _, err = run_cli(
        "compare", "--methods", "v-timeprest", *argv, "--batch-size", "16", "--out", str(out)
    )
    assert_one_line_error(rc, err, "compare", "already holds a different run")
    assert (out / "split.json").read_text() == before


def test_parse_methods():
    specs = parse_methods("pipedream, i-timeprest@0.25,i-timeprest")
    assert [(s.text, s.method, s.decay) for s in specs] == [
        ("pipedream", "pipedream", None),
        ("i-timeprest@0.25", "i-timeprest", 0.25),
        ("i-timeprest", "i-timeprest", None),
    ]
    with pytest.raises(ConfigError):
        parse_methods("")


# -- plot -----------------------------------------------------------------------------


def test_plot_cli_writes_pngs(compared, tmp_path):
    out, _ = compared
    rc, stdout, err = run_cli(
        "plot", str(out / "pipedream"), str(out / "v-timeprest"), "--out", str(tmp_path / "figs")
    )
    assert rc == 0, err
    assert stdout.split() == [str(tmp_path / "figs" / n) for n in PLOT_FILES]
    for name in PLOT_FILES:
        assert_png(tmp_path / "figs" / name)


def test_plot_default_out_of_one_dir_is_inside_it(out_copy):
    shutil.rmtree(out_copy / "plots")
    rc, _, err = run_cli("plot", str(out_copy / "pipedream"))
    assert rc == 0, err
    for name in PLOT_FILES:
        assert_png(out_copy / "pipedream" / "plots" / name)


def test_plot_bad_input(compared, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli("plot", str(empty), "--out", str(tmp_path / "f"))
    assert_one_line_error(rc, err, "plot", "is not a run directory (no config.json)")

    rc, _, err = run_cli("plot", str(tmp_path / "missing"), "--out", str(tmp_path / "f"))
    assert_one_line_error(rc, err, "plot", "is not a directory")

    started = tmp_path / "started"  # config written, no epoch finished yet
    started.mkdir()
    shutil.copy(compared[0] / "pipedream" / "config.json", started / "config.json")
    rc, _, err = run_cli("plot", str(started), "--out", str(tmp_path / "f"))
    assert_one_line_error(rc, err, "plot", "has no finished epoch yet")

    (started / "epochs.jsonl").write_text('{"epoch": 1, "train_lo\n')
    rc, _, err = run_cli("plot", str(started), "--out", str(tmp_path / "f"))
    assert_one_line_error(rc, err, "plot", "line 1: not JSON")

    (started / "epochs.jsonl").write_text('{"epoch": 1}\n')
    rc, _, err = run_cli("plot", str(started), "--out", str(tmp_path / "f"))
    assert_one_line_error(rc, err, "plot", "lacks train_loss")
    assert not (tmp_path / "f").exists()


def test_plot_without_matplotlib(compared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rc, _, err = run_cli("plot", str(compared[0] / "pipedream"), "--out", str(tmp_path / "f"))
    assert_one_line_error(rc, err, "plot", "plotting needs matplotlib: pip install timeprest[plot]")


def test_labels(compared):
    assert (
        run_label({"method": "pipedream", "decay": None, "resolved": {"backward": "stashed"}})
        == "pipedream"
    )
    # lambda shows where it acts, set or default
    assert (
        run_label({"method": "i-timeprest", "resolved": {"backward": "intermediate", "decay": 1.0}})
        == "i-timeprest λ=1"
    )
    assert run_label({"method": "gpipe", "decay": 0.5, "resolved": {}}) == "gpipe λ=0.5"
    # the same run twice: labels stay distinct
    runs = load_runs([compared[0] / "pipedream", compared[0] / "pipedream"])
    assert len({r.label for r in runs}) == 2
    # a compare directory stands for its runs, in the order of --methods
    assert [r.label for r in load_runs([compared[0]])] == [
        "pipedream",
        "v-timeprest",
        "i-timeprest λ=0.5",
    ]
