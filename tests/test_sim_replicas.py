"""The simulator's data-parallel term: a ring all-reduce before each update, against its closed form."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli
from timeprest.errors import ConfigError
from timeprest.sim import CostModel
from timeprest.sim.replicas import allreduce_time, with_data_parallel
from timeprest.sim.simulate import simulate


@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_allreduce_time_is_the_ring_closed_form(d: int) -> None:
    nbytes, bw, lat = 3_000_000, 2.5e9, 1e-5
    want = 0.0 if d == 1 else 2 * (d - 1) / d * nbytes / bw + 2 * (d - 1) * lat
    assert allreduce_time(nbytes, d, bw, lat) == pytest.approx(want, rel=1e-15)
    assert allreduce_time(nbytes, d, None, 0.0) == 0.0  # an infinitely fast link


def test_the_term_sits_in_each_update_and_throughput_counts_d_replicas() -> None:
    base = CostModel.uniform(1, 1.0, 2.0, 0.0, update_time=0.5, weight_bytes=1_000_000)
    cm, dp = with_data_parallel(base, 4, bandwidth=1e8, latency=1e-3)
    term = 2 * 3 / 4 * 1_000_000 / 1e8 + 6 * 1e-3
    assert dp.reduce_times == pytest.approx((term,))
    # one stage of GPipe, N = 2: each mini-batch takes N (F + B) + U + the all-reduce
    one = simulate("gpipe", 1, 2, 8, base)
    four = simulate("gpipe", 1, 2, 8, cm)
    assert one.time_per_minibatch == pytest.approx(2 * 3.0 + 0.5)
    assert four.time_per_minibatch == pytest.approx(2 * 3.0 + 0.5 + term)
    assert dp.throughput(four) == pytest.approx(4 / (6.5 + term))
    with pytest.raises(ConfigError, match="--data-parallel must be an integer >= 1"):
        with_data_parallel(base, 0)


def test_simulate_cli_reports_the_replicas() -> None:
    argv = ["simulate", "--stages", "2", "--microbatches", "2", "--minibatches", "8"]
    dp = ["--data-parallel", "2", "--weight-bytes", "4000000", "--dp-bandwidth", "1e9"]
    rc, out, err = run_cli(*argv, *dp, "--format", "json")
    assert rc == 0, err
    got = json.loads(out)["data_parallel"]
    assert got["replicas"] == 2 and got["allreduce_time"] == pytest.approx([0.004, 0.004])
    rc, out, err = run_cli(*argv, *dp)
    assert rc == 0, err
    assert "data parallel: D=2 replicas, 4 processes" in out
    rc, out, _ = run_cli(*argv)
    assert "data parallel" not in out
