"""`timeprest train` end to end: the run directory, config precedence, bad input; TensorBoard rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import SMALL_RUN, run_cli
from helpers import assert_one_line_error as one_line_error
from timeprest.data import download
from timeprest.train import EpochRow
from timeprest.train.tensorboard import EpochWriter

# small and quick: 8 mini-batches of 32 rows, two stages split by parameter count
BASE = [*SMALL_RUN, "--epochs", "1"]

EPOCH_FIELDS = {
    "epoch",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "epoch_time",
    "wall_time",
    "samples_per_s",
    "lr_factor_end",
    "mean_staleness",
    "mean_relative_distance",
    "peak_versions",
    "peak_weight_bytes",
    "weight_bytes",
    "peak_activation_bytes",
    "optimizer_state_bytes",
}
PER_STAGE = {
    "mean_staleness",
    "mean_relative_distance",
    "peak_versions",
    "peak_weight_bytes",
    "weight_bytes",
    "peak_activation_bytes",
    "optimizer_state_bytes",
}


def train(*argv: str) -> tuple[int, str, str]:
    """Run `timeprest train` in-process; return exit code, stdout, stderr."""
    return run_cli("train", *argv)


def assert_one_line_error(rc: int, err: str, match: str) -> None:
    one_line_error(rc, err, "train", match)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """One epoch of i-timeprest (the default method) on the small synthetic set."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    rc, out, err = train(*BASE, "--run-dir", str(run_dir))
    assert rc == 0, err
    return run_dir, out


def test_train_writes_every_run_file(trained):
    run_dir, out = trained
    assert "epoch 1/1: train loss" in out and "done: final test accuracy" in out

    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "synthetic:train=256,test=128"
    assert (config["model"], config["method"], config["stages"]) == ("mlp", "i-timeprest", 2)
    assert (config["batch_size"], config["epochs"], config["balance"]) == (32, 1, "params")
    assert config["run_dir"] == str(run_dir)
    resolved = config["resolved"]
    assert resolved["schedule"] == "nf1b" and resolved["backward"] == "intermediate"
    assert resolved["num_microbatches"] == 2  # the method has no default: N = W

    env = json.loads((run_dir / "env.json").read_text())
    assert {"python", "torch", "timeprest", "platform", "threads", "device", "engine"} <= set(env)
    assert env["device"] == "cpu" and env["engine"] == "emulate"

    split = json.loads((run_dir / "split.json").read_text())
    assert split["balance"] == "params"
    assert len(split["layer_counts"]) == 2 and min(split["layer_counts"]) >= 1
    assert sum(split["layer_counts"]) == len(split["layer_costs"])

    (row,) = jsonl(run_dir / "epochs.jsonl")
    assert EPOCH_FIELDS <= set(row)
    assert row["epoch"] == 1
    for key in PER_STAGE:
        assert len(row[key]) == 2, key
    assert row["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert row["train_loss"] > 0 and row["epoch_time"] > 0 and row["samples_per_s"] > 0
    assert row["peak_versions"][0] >= 1 and row["weight_bytes"][0] > 0
    assert row["mean_staleness"][1] == 0  # the last stage runs its backward right away

    mbs = jsonl(run_dir / "minibatches.jsonl")
    assert [m["minibatch"] for m in mbs] == list(range(8))
    for m in mbs:
        assert m["epoch"] == 1 and m["loss"] > 0
        assert len(m["forward_versions"]) == 2 and len(m["forward_versions"][0]) == 2
        assert len(m["staleness"]) == 2 and len(m["relative_distance"]) == 2
        assert len(m["backward_version"]) == 2

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["method"] == "i-timeprest"
    assert summary["final_test_accuracy"] == row["test_accuracy"]
    assert summary["best_test_accuracy"] == row["test_accuracy"]
    assert summary["peak_weight_bytes"] == row["peak_weight_bytes"]


def test_checkpoint_written_and_resume_continues(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    ckpt = run_dir / "checkpoint"
    assert {"manifest.json", "stage0.pt", "stage1.pt", "progress.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert json.loads((ckpt / "progress.json").read_text())["epoch"] == 1
    rc, out, err = train(*BASE, "--epochs", "2", "--run-dir", str(run_dir), "--resume")
    assert rc == 0, err
    assert "resumed" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    rows = jsonl(run_dir / "epochs.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == jsonl(trained[0] / "epochs.jsonl")[0]  # epoch 1 kept as it was
    assert [m["minibatch"] for m in jsonl(run_dir / "minibatches.jsonl")] == list(range(16))
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "settings.toml"
    # dashes and underscores are both accepted as keys
    cfg.write_text('lr = 0.01\nepochs = 3\nbatch-size = 64\nmethod = "v-timeprest"\n')
    run_dir = tmp_path / "run"
    rc, _, err = train(*BASE, "--config", str(cfg), "--epochs", "1", "--run-dir", str(run_dir))
    assert rc == 0, err
    config = json.loads((run_dir / "config.json").read_text())
    # the flag overrides the file; the file overrides the defaults; BASE's --batch-size wins too
    assert config["epochs"] == 1
    assert config["lr"] == 0.01
    assert config["method"] == "v-timeprest"
    assert config["batch_size"] == 32
    assert len(jsonl(run_dir / "epochs.jsonl")) == 1


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--optimizer", "nope"], "unknown --optimizer 'nope'"),
        (["--stages", "0"], "--stages must be an integer >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["--batch-size", "-4"], "--batch-size must be an integer >= 1, got -4"),
        (["--train-limit", "0"], "--train-limit must be an integer >= 1, got 0"),
        (["--microbatches", "-1"], "--microbatches must be an integer >= 1, got -1"),
        (["--lr", "-0.1"], "--lr must be a positive number"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--transport", "tcp"], "--transport"),
        (
            ["--batch-size", "2", "--microbatches", "4"],
            "--batch-size 2 is smaller than --microbatches 4",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, match, tmp_path):
    rc, _, err = train(*BASE, *argv, "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, match)
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist"),
        ("lr = = 1\n", "cannot read config file"),
        ("learning_rate = 0.1\n", "unknown key 'learning_rate'"),
        ("dir", "cannot read config file"),  # a directory, not a file
    ],
)
def test_unreadable_config_file(content, match, tmp_path):
    path = tmp_path / "c.toml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    rc, _, err = train(*BASE, "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, match)


@pytest.mark.parametrize(
    "content,key",
    [('lr = "0.1"\n', "lr"), ('momentum = "x"\n', "momentum"), ("balance = 3\n", "balance")],
)
def test_config_file_value_of_the_wrong_type(content, key, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(content)
    argv = [a for a in BASE if a not in ("--balance", "params")]
    rc, _, err = train(*argv, "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, key)


@pytest.mark.parametrize("flag", ["--weight-decay", "--momentum", "--warmup-epochs"])
def test_nan_hyperparameter_is_refused_up_front(flag, tmp_path):
    rc, _, err = train(*BASE, flag, "nan", "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, flag)
    assert not (tmp_path / "run" / "config.json").exists()


def test_missing_data_without_network(tmp_path, monkeypatch):
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.delenv("TIMEPREST_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached copy either
    calls = []

    def offline(name, dest):
        calls.append(name)
        raise OSError("network is unreachable")

    monkeypatch.setattr(download, "fetch_dataset", offline)
    argv = [*BASE, "--dataset", "mnist", "--data-dir", str(empty), "--run-dir", str(tmp_path / "r")]
    rc, _, err = train(*argv)
    assert_one_line_error(rc, err, "mnist not found")
    assert "download failed (network is unreachable)" in err and str(empty) in err
    assert calls == ["mnist"]


def test_run_dir_holding_another_run_is_refused(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    rd = ["--run-dir", str(run_dir)]

    rc, _, err = train(*BASE, "--lr", "0.1", *rd)
    assert_one_line_error(rc, err, "already holds a different run (lr=0.001)")
    assert "--overwrite" in err
    rc, _, err = train(*BASE, *rd)
    assert_one_line_error(rc, err, "already holds a run with this configuration")
    rc, _, err = train(*BASE, "--lr", "0.1", "--resume", *rd)
    assert_one_line_error(rc, err, "cannot resume")
    # refusals leave the run as it was
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before

    rc, _, err = train(*BASE, "--lr", "0.1", "--overwrite", *rd)
    assert rc == 0, err
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.1


def test_resume_without_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    rc, _, err = train(*BASE, "--resume", "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, "holds no run")


def test_non_empty_dir_without_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    rc, _, err = train(*BASE, "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, "exists and is not empty")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


# -- TensorBoard ----------------------------------------------------------------------


class FakeSummaryWriter:
    """Records what EpochWriter sends, as torch's SummaryWriter would receive it."""

    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0
        self.closed = False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.scalars.append((tag, scalar_value, global_step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def test_tensorboard_writer_logs_epoch_rows(trained, monkeypatch, tmp_path):
    import timeprest.train.tensorboard as tb

    monkeypatch.setattr(tb, "summary_writer_class", lambda: FakeSummaryWriter)
    (row,) = jsonl(trained[0] / "epochs.jsonl")
    w = EpochWriter(tmp_path, start_epoch=3)
    assert w.active
    fake = FakeSummaryWriter.instances[-1]
    assert fake.log_dir == str(tmp_path / "tensorboard") and fake.purge_step == 4
    w.write(EpochRow.from_dict(row))
    got = {tag: (v, step) for tag, v, step in fake.scalars}
    assert got["test/accuracy"] == (row["test_accuracy"], 1)
    assert got["train/loss"] == (row["train_loss"], 1)
    assert got["staleness/stage0"] == (row["mean_staleness"][0], 1)
    assert got["peak_weight_bytes/stage1"] == (row["peak_weight_bytes"][1], 1)
    assert got["weight_versions/stage0"] == (row["peak_versions"][0], 1)
    assert fake.flushes == 1  # each epoch reaches the disk before the next starts
    w.close()
    assert fake.closed and not w.active


def test_tensorboard_writer_is_a_no_op_without_the_package(monkeypatch, tmp_path):
    import timeprest.train.tensorboard as tb

    monkeypatch.setattr(tb, "summary_writer_class", lambda: None)
    w = EpochWriter(tmp_path)
    assert not w.active
    w.write(EpochRow.from_dict({**{k: [0] for k in EPOCH_FIELDS}, "epoch": 1}))
    w.close()
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_real_event_files(trained, tmp_path):
    pytest.importorskip("tensorboard")
    (row,) = jsonl(trained[0] / "epochs.jsonl")
    w = EpochWriter(tmp_path)
    w.write(EpochRow.from_dict(row))
    w.close()
    assert any(
        p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir()
    )


@pytest.mark.parametrize("target, want", [(0.45, 2), (0.2, 1), (0.9, None), (None, None)])
def test_epochs_to_target_is_the_first_epoch_that_reaches_it(target, want):
    from timeprest.train import TrainConfig, summarize

    history = [
        EpochRow.from_dict({**{k: 0 for k in EPOCH_FIELDS}, "epoch": e + 1, "test_accuracy": acc})
        for e, acc in enumerate([0.2, 0.5, 0.4])
    ]
    summary = summarize(TrainConfig(target_accuracy=target), history)
    assert summary["epochs_to_target"] == want
    assert summary["best_epoch"] == 2 and summary["final_test_accuracy"] == 0.4


def test_resume_with_a_corrupt_split_file_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    rc, _, err = train(*BASE, "--run-dir", str(run_dir))
    assert rc == 0, err
    (run_dir / "split.json").write_text("{not json")
    rc, _, err = train(*BASE, "--epochs", "2", "--run-dir", str(run_dir), "--resume")
    assert_one_line_error(rc, err, "split.json is unreadable")


@pytest.mark.parametrize(("transport", "used"), [("auto", "shm"), ("process-group", None)])
def test_distributed_outside_torchrun_relaunches_the_same_loop(tmp_path, transport, used):
    """``--engine distributed --nproc 2`` starts torchrun itself; its workers run the one loop
    (same files, same numbers as the emulator, over either transport) and the parent reads
    the result back."""
    base = [*BASE, "--threads", "1", "--lr-schedule", "constant"]
    rc, _, err = train(*base, "--run-dir", str(tmp_path / "emulated"))
    assert rc == 0, err
    dist_run = ["--engine", "distributed", "--nproc", "2", "--transport", transport]
    rc, out, err = train(*base, *dist_run, "--run-dir", str(tmp_path / "dist"))
    assert rc == 0, err
    assert "starting 2 processes with torchrun" in out
    for name in ("config.json", "env.json", "split.json", "summary.json"):
        assert (tmp_path / "dist" / name).is_file(), name
    env = json.loads((tmp_path / "dist" / "env.json").read_text())
    assert env["processes"] == 2
    assert env["transport"] == (used or transport)
    want = jsonl(tmp_path / "emulated" / "minibatches.jsonl")
    got = jsonl(tmp_path / "dist" / "minibatches.jsonl")
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    keys = ("train_loss", "test_loss", "test_accuracy", "peak_versions")
    (e_want,) = jsonl(tmp_path / "emulated" / "epochs.jsonl")
    (e_got,) = jsonl(tmp_path / "dist" / "epochs.jsonl")
    assert [e_got[k] for k in keys] == [e_want[k] for k in keys]


@pytest.mark.parametrize(
    "extra", [[], ["--eval-every", "3"], ["--distance-every", "2"]], ids=["plain", "eval", "every2"]
)
def test_epoch_rows_average_every_minibatch_record(tmp_path: Path, extra: list[str]) -> None:
    """The epoch row's staleness and distance are the means over that epoch's mini-batch
    records (a regression: they once read an already-emptied report and said 0)."""
    run = tmp_path / "run"
    rc, _, err = run_cli(
        "train", *SMALL_RUN, "--method", "pipedream", "--epochs", "2", "--run-dir", str(run),
        *extra,
    )  # fmt: skip
    assert rc == 0, err
    rows = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run / "minibatches.jsonl").read_text().splitlines()]
    for row in rows:
        mine = [r for r in records if r["epoch"] == row["epoch"]]
        stage0 = [d for r in mine for d in r["staleness"][0]]
        assert row["mean_staleness"][0] == pytest.approx(sum(stage0) / len(stage0))
        assert row["mean_staleness"][0] > 0
        # measured every --distance-every mini-batches (null elsewhere): the mean of those
        dist = [r["relative_distance"][0] for r in mine if r["relative_distance"][0] is not None]
        assert row["mean_relative_distance"][0] == pytest.approx(sum(dist) / len(dist))
    every = 2 if "--distance-every" in extra else 10
    # measured exactly at the mini-batches t % every == 0, None at every other one
    measured = [r["minibatch"] for r in records if r["relative_distance"][0] is not None]
    assert measured == [r["minibatch"] for r in records if r["minibatch"] % every == 0]
    assert any(r["relative_distance"][0] for r in records)


def test_a_last_minibatch_too_short_for_the_replicas_is_refused_up_front(tmp_path: Path) -> None:
    """33 rows in mini-batches of 16 leave 1 row for 2 replicas x 2 micro-batches: an error
    before the first step, not a failure in the middle of the epoch."""
    rc, _, err = run_cli(
        "train", "--dataset", "synthetic:train=33,test=16", "--model", "mlp", "--stages", "2",
        "--batch-size", "16", "--microbatches", "2", "--data-parallel", "2", "--no-progress",
        "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert_one_line_error(rc, err, "last mini-batch of each epoch has 1 rows")
    assert not (tmp_path / "run" / "minibatches.jsonl").exists()


def test_mlp_with_its_flatten_alone_on_the_first_stage(tmp_path: Path) -> None:
    """The mlp's first layer is its Flatten: a first stage of that alone has nothing to
    train (the default split of ``--model mlp`` at W = 4 is 1,1,2,2 layers)."""
    args = [a for a in BASE if a not in ("--balance", "params")]
    args[args.index("--stages") + 1] = "4"
    rc, out, err = train(*args, "--balance", "1,1,2,2", "--run-dir", str(tmp_path / "run"))
    assert rc == 0, err
    assert "layers per stage 1,1,2,2" in out
    rows = jsonl(tmp_path / "run" / "epochs.jsonl")
    assert len(rows) == 1 and rows[0]["weight_bytes"][0] == 0
