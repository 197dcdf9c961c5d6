"""`timeprest schedule` and the CLI's error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from timeprest.cli import main


def test_schedule_grid_paper(capsys):
    rc = main(
        [
            "schedule",
            "--method",
            "v-timeprest",
            "--stages",
            "3",
            "--microbatches",
            "2",
            "--minibatches",
            "4",
            "--costs",
            "paper",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("v-timeprest: schedule nf1b, W=3, N=2, T=4, costs paper")
    rows = [ln for ln in lines if ln.startswith("stage")]
    assert len(rows) == 3
    cells0 = rows[0].split("|")[1].split()
    assert cells0[:7] == ["F0.0", "F0.1", "F1.0", "F1.1", "F2.0", "F2.1", "B0"]
    assert rows[2].split("|")[1].split()[:5] == ["-", "-", "F0.0", "F0.1", "B0"]


def test_schedule_json_parses_and_matches_programs(capsys):
    rc = main(
        [
            "schedule",
            "--method",
            "pipedream-2bw",
            "--stages",
            "2",
            "--microbatches",
            "2",
            "--minibatches",
            "3",
            "--format",
            "json",
        ]
    )
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["method"], data["stages"], data["microbatches"], data["minibatches"]) == (
        "pipedream-2bw",
        2,
        2,
        3,
    )
    assert len(data["programs"]) == 2
    assert "U0" in data["programs"][0]
    flat_grid = [c for row in data["grid"] for c in row if c is not None]
    assert not any(c.startswith("U") for c in flat_grid)
    # every non-U action appears in the grid for as many units as it lasts (F 1, B 2)
    for s, prog in enumerate(data["programs"]):
        for a in prog:
            n = data["grid"][s].count(a)
            assert n == {"F": 1, "B": 2, "U": 0}[a[0]]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--method", "nope", "--stages", "2"], "unknown method 'nope'"),
        (["--method", "gpipe", "--stages", "0"], "number of stages must be an integer >= 1"),
        (["--method", "gpipe", "--stages", "2", "--microbatches", "0"], "micro-batches"),
        (["--method", "pipedream-2bw", "--stages", "3", "--microbatches", "2"], "N >= W"),
    ],
)
def test_schedule_errors_are_one_line_exit_2(argv, match, capsys):
    rc = main(["schedule", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert match in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_multiple_sequence_warning_is_printed(capsys):
    rc = main(["schedule", "--method", "timeprest", "--stages", "4", "--microbatches", "1"])
    assert rc == 0
    assert "multiple-sequence problem" in capsys.readouterr().err


def test_console_entry_point_runs_as_module():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "timeprest",
            "schedule",
            "--method",
            "gpipe",
            "--stages",
            "2",
            "--microbatches",
            "2",
            "--minibatches",
            "1",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["programs"][0] == ["F0.0", "F0.1", "B0.1", "B0.0", "U0"]
    bad = subprocess.run(
        [sys.executable, "-m", "timeprest", "schedule", "--method", "x", "--stages", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
