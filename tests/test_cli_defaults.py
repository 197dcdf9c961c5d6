"""Every command resolves the same method and N for the same flags (one home for defaults)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from timeprest.cli import build_parser
from timeprest.cli.common import config_from_args
from timeprest.compare import method_config, parse_methods
from timeprest.policy import DEFAULT_METHOD
from timeprest.sim import CostModel

# flags, then the method and N every command must resolve from them
CASES = [
    ([], DEFAULT_METHOD, 4),  # the defaults: W = 4, and the method has no N of its own
    (["--method", "pipedream"], "pipedream", 1),  # PipeDream's own N = 1
    (["--method", "v-timeprest", "--stages", "3"], "v-timeprest", 3),  # N = W
    (["--method", "gpipe", "--microbatches", "2"], "gpipe", 2),
]


def schedule_cmd(flags: list[str], tmp_path: Path) -> tuple[str, int]:
    rc, out, err = run_cli("schedule", *flags, "--format", "json")
    assert rc == 0, err
    data = json.loads(out)
    return data["method"], data["microbatches"]


def simulate_cmd(flags: list[str], tmp_path: Path) -> tuple[str, int]:
    rc, out, err = run_cli("simulate", *flags, "--minibatches", "4", "--format", "json")
    assert rc == 0, err
    data = json.loads(out)
    return data["method"], data["microbatches"]


def profile_cmd(flags: list[str], tmp_path: Path) -> tuple[str, int]:
    out_file = tmp_path / "costs.json"
    rc, _, err = run_cli(
        "profile", "--model", "mlp", "--dataset", "synthetic:train=32,test=8",
        "--batch-size", "16", "--balance", "params", "--warmup", "0", "--repeats", "1",
        "--out", str(out_file), *flags,
    )  # fmt: skip
    assert rc == 0, err
    meta = CostModel.load(out_file).meta
    return meta["timed"].removeprefix("engine, method "), meta["num_microbatches"]


def train_cmd(flags: list[str], tmp_path: Path) -> tuple[str, int]:
    cfg = config_from_args(build_parser().parse_args(["train", *flags]))
    r = cfg.resolved(warn=False)  # what the run would train, without training it
    return r.method.name, r.num_microbatches


def compare_cmd(flags: list[str], tmp_path: Path) -> tuple[str, int]:
    # compare takes --methods, not --method: the method under test is its one entry
    method = flags[flags.index("--method") + 1] if "--method" in flags else DEFAULT_METHOD
    rest = [f for i, f in enumerate(flags) if "--method" not in (f, flags[i - 1] if i else "")]
    args = build_parser().parse_args(["compare", "--methods", method, *rest])
    cfg = method_config(config_from_args(args), parse_methods(args.methods)[0], tmp_path)
    return cfg.method, cfg.num_microbatches


COMMANDS = [schedule_cmd, simulate_cmd, profile_cmd, train_cmd, compare_cmd]


@pytest.mark.parametrize("flags, method, n", CASES)
def test_every_command_resolves_the_same_method_and_n(flags, method, n, tmp_path):
    got = {c.__name__: c(flags, tmp_path) for c in COMMANDS}
    assert got == {c.__name__: (method, n) for c in COMMANDS}
