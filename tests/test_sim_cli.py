"""``timeprest simulate`` and ``timeprest profile`` from the command line (in process)."""

from __future__ import annotations

import json

import pytest

from timeprest.cli import main
from timeprest.sim import CostModel


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_text(capsys):
    code, out, err = run(
        capsys, "simulate", "--method", "v-timeprest", "--stages", "4", "--microbatches", "4"
    )
    assert code == 0, err
    assert "time per mini-batch 12 s" in out and "period 1" in out
    assert "no memory sizes given" in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith(("0 ", "3 "))]) == 2


def test_simulate_json_has_the_documented_keys(capsys):
    code, out, _ = run(
        capsys,
        "simulate", "--method", "gpipe", "--stages", "3", "--microbatches", "2",
        "--minibatches", "4", "--format", "json",
        "--forward-time", "1", "--backward-time", "1", "--weight-bytes", "100",
    )  # fmt: skip
    assert code == 0
    d = json.loads(out)
    assert d["time_per_minibatch"] == pytest.approx(8.0)  # (N + W - 1)(F + B)
    assert d["throughput"] == pytest.approx(1 / 8.0)
    assert d["bubble_fraction"] == pytest.approx([0.5, 0.5, 0.5])  # (W-1)/(N+W-1)
    assert d["weight_versions"] == [1, 1, 1]
    assert d["peak_memory_bytes"] == [100, 100, 100]


def test_simulate_writes_trace_and_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    trace, png = tmp_path / "t.json", tmp_path / "g.png"
    code, out, err = run(
        capsys,
        "simulate", "--method", "pipedream", "--stages", "3", "--minibatches", "6",
        "--trace", str(trace), "--png", str(png),
    )  # fmt: skip
    assert code == 0, err
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e["ph"] == "X" and e["name"] == "F0.0 v0" for e in events)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out and str(trace) in out


def test_simulate_with_a_cost_file(capsys, tmp_path):
    path = tmp_path / "c.json"
    CostModel.uniform(2, 0.5, 1.0, weight_bytes=10).save(path)
    code, out, _ = run(
        capsys, "simulate", "--method", "v-timeprest", "--stages", "2", "--cost-file", str(path),
        "--format", "json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["time_per_minibatch"] == pytest.approx(2 * 1.5)


def _one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timeprest "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_simulate_bad_inputs(capsys, tmp_path):
    base = ["simulate", "--method", "gpipe", "--stages", "2"]
    _one_line_error(*run(capsys, *base, "--cost-file", str(tmp_path / "no.json")), "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(*run(capsys, *base, "--cost-file", str(bad)), "not valid JSON")
    neg = tmp_path / "neg.json"
    data = CostModel.uniform(2).to_json()
    data["stages"][0]["forward_time"] = -1
    neg.write_text(json.dumps(data))
    _one_line_error(*run(capsys, *base, "--cost-file", str(neg)), "stage 0", "forward_time")
    three = tmp_path / "three.json"
    CostModel.uniform(3).save(three)
    _one_line_error(*run(capsys, *base, "--cost-file", str(three)), "3 stages", "--stages 2")
    _one_line_error(
        *run(capsys, *base, "--cost-file", str(three), "--forward-time", "2"), "drop --forward-time"
    )
    _one_line_error(*run(capsys, *base, "--forward-time", "-1"), "--forward-time")
    _one_line_error(*run(capsys, *base, "--comm-time", "-0.5"), "--comm-time")
    _one_line_error(*run(capsys, *base, "--backward-time", "0"), "--backward-time")
    _one_line_error(*run(capsys, *base, "--weight-bytes", "-3"), "--weight-bytes")
    _one_line_error(*run(capsys, "simulate", "--method", "nope", "--stages", "2"), "unknown method")
    _one_line_error(
        *run(
            capsys, "simulate", "--method", "pipedream-2bw", "--stages", "4", "--microbatches", "2"
        ),
        "N >= W",
    )


def profile_mlp(capsys, out_file, warmup: str, *extra: str):
    """`timeprest profile` of the mlp on a small synthetic set, W = N = 2, into out_file."""
    return run(
        capsys,
        "profile", "--model", "mlp", "--dataset", "synthetic:train=32,test=8",
        "--stages", "2", "--batch-size", "16", "--microbatches", "2", "--balance", "params",
        "--warmup", warmup, "--repeats", "1", *extra, "--out", str(out_file),
    )  # fmt: skip


def test_profile_writes_a_cost_file_simulate_reads(capsys, tmp_path):
    pytest.importorskip("timeprest.models")
    out_file = tmp_path / "costs.json"
    code, out, err = profile_mlp(capsys, out_file, "0", "--bandwidth", "1e9")
    assert code == 0, err
    cm = CostModel.load(out_file)
    assert cm.num_stages == 2 and cm.bandwidth == 1e9
    assert cm.meta["model"] == "mlp" and cm.meta["microbatch_rows"] == 8
    assert cm.meta["timed"] == "engine, method i-timeprest" and "engine, method" in out
    assert all(c.weight_bytes > 0 and c.forward_time > 0 for c in cm.stages)
    assert cm.stages[0].output_bytes > 0 and cm.stages[1].output_bytes == 0
    code, out, err = run(
        capsys, "simulate", "--method", "pipedream", "--stages", "2", "--cost-file", str(out_file)
    )
    assert code == 0, err
    assert "KiB" in out


def test_profile_times_the_distributed_runtime(capsys, tmp_path):
    """--engine distributed: the sizes and link as before, the times from a short run of
    the runtime in two torchrun workers, no per-message overhead (it is in the times)."""
    pytest.importorskip("timeprest.models")
    out_file = tmp_path / "costs.json"
    code, out, err = profile_mlp(capsys, out_file, "1", "--repeats", "2", "--engine", "distributed")
    assert code == 0, err
    cm = CostModel.load(out_file)
    assert cm.meta["timed"] == "distributed runtime, method i-timeprest"
    assert cm.meta["threads"] == 1  # per process, as the runtime runs by default
    assert cm.meta["emulator_threads"] >= 1  # what the emulator's times were taken with
    assert "timing the actions in 2 processes" in out and cm.overhead == 0.0
    emulated = cm.meta["emulator_times"]
    assert len(emulated) == 2 and all(f > 0 and b > 0 for f, b, _ in emulated)
    assert all(c.forward_time > 0 and c.backward_time > 0 for c in cm.stages)
    assert cm.stages[0].output_bytes > 0 and cm.stages[0].weight_bytes > 0


def test_a_failed_distributed_profile_is_one_line(capsys, tmp_path, monkeypatch):
    pytest.importorskip("timeprest.models")
    import timeprest.engine.launch as launch

    monkeypatch.setattr(launch, "launch_local", lambda *args, **kw: 1)
    base = ["profile", "--model", "mlp", "--dataset", "synthetic:train=32,test=8"]
    out_file = tmp_path / "c.json"
    code, out, err = run(
        capsys, *base, "--stages", "2", "--engine", "distributed", "--out", str(out_file)
    )
    assert code == 2 and out.strip() == "timing the actions in 2 processes (torchrun, loopback)"
    _one_line_error(code, "", err, "torchrun exit code 1")
    assert not out_file.exists()  # nothing half-written


def test_profile_bad_inputs(capsys, tmp_path):
    base = ["profile", "--model", "mlp", "--dataset", "synthetic:train=32,test=8"]
    out = ["--out", str(tmp_path / "c.json")]
    _one_line_error(*run(capsys, *base, "--stages", "2", "--balance", "1,x", *out), "--balance")
    _one_line_error(
        *run(capsys, *base, "--stages", "2", "--batch-size", "1", "--microbatches", "2", *out),
        "--batch-size",
    )
    _one_line_error(*run(capsys, *base, "--stages", "2", "--latency", "-1", *out), "--latency")
    _one_line_error(
        *run(capsys, *base, "--stages", "2", "--method", "pipedreem", *out), "unknown method"
    )
    _one_line_error(
        *run(capsys, *base, "--stages", "2", "--measure-link", "--latency", "1", *out),
        "not both",
    )
    _one_line_error(*run(capsys, *base, "--stages", "2", "--threads", "0", *out), "--threads")
    distributed = ["--stages", "2", "--engine", "distributed", *out]
    _one_line_error(*run(capsys, *base, *distributed, "--layers-only"), "--layers-only")
    _one_line_error(*run(capsys, *base, *distributed, "--device", "cuda"), "drop --device")


def test_simulate_message_overhead(capsys):
    base = ["simulate", "--method", "1f1b", "--stages", "3", "--microbatches", "3"]
    code, out, err = run(capsys, *base, "--format", "json")
    assert code == 0, err
    plain = json.loads(out)["time_per_minibatch"]
    code, out, err = run(capsys, *base, "--message-overhead", "0.5", "--format", "json")
    assert code == 0, err
    # 1f1b with flush: (N + W - 1) slots of F + B = 3; the middle stage has two
    # neighbours, so its F + B becomes (1 + 2 * 0.5) + (2 + 2 * 0.5) = 5 (the end
    # stages' 4): slower, but at most 5 slots of 5
    assert plain == pytest.approx(15.0)
    assert 15.0 < json.loads(out)["time_per_minibatch"] <= 25.0
    _one_line_error(*run(capsys, *base, "--message-overhead", "-1"), "--message-overhead")


def test_remedy_flags_reach_the_simulator(capsys) -> None:
    """`--correction gap-aware` on pipedream simulates what the gap-aware preset does
    (a regression: the simulator once kept only the forward/backward rules)."""
    base = ("simulate", "--stages", "3", "--format", "json")
    rc, out, _ = run(capsys, *base, "--method", "pipedream", "--correction", "gap-aware")
    assert rc == 0
    flagged = json.loads(out)
    rc, out, _ = run(capsys, *base, "--method", "gap-aware")
    preset = json.loads(out)
    assert flagged["extra_buffers"] == preset["extra_buffers"] == [1, 1, 1]
    assert flagged["policy"] == preset["policy"]
