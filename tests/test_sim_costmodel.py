"""sim/costmodel.py: per-stage costs, the link, and the cost file format."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from timeprest.errors import ConfigError
from timeprest.sim import CostModel, StageCost, simulate
from timeprest.sim.costmodel import stage_costs, uniform_or_file


def test_cost_model_json_round_trip(tmp_path):
    cm = CostModel(
        stage_costs(
            [0.1, 0.2],
            [0.3, 0.4],
            update_time=[0.01, 0.02],
            output_bytes=[4096, 0],
            weight_bytes=[10, 20],
            optimizer_state_bytes=[30, 40],
            saved_activation_bytes=[50, 60],
        ),
        input_bytes=128,
        bandwidth=1024.0,
        latency=0.5,
        meta={"model": "tiny"},
    )
    path = tmp_path / "costs.json"
    cm.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["format"] == "timeprest-costs"
    back = CostModel.load(path)
    assert back == cm and back.meta == {"model": "tiny"}
    costs = back.to_costs()
    assert costs.forward == (0.1, 0.2) and costs.backward == (0.3, 0.4)
    assert costs.update == (0.01, 0.02)
    assert costs.comm == (0.5 + 4096 / 1024.0,)  # latency + bytes / bandwidth
    assert back.input_bytes_of(0) == 128 and back.input_bytes_of(1) == 4096


def test_uniform_comm_time_is_the_latency():
    cm = CostModel.uniform(3, 1.0, 2.0, 0.25, output_bytes=10**9)
    assert cm.to_costs().comm == (0.25, 0.25)
    assert cm.stages[-1].output_bytes == 0  # the last stage sends nothing forward
    with pytest.raises(ConfigError, match="integer >= 1"):
        CostModel.uniform(0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d.pop("version"), "version None"),
        (lambda d: d.update(stages=[]), "non-empty list"),
        (lambda d: d["stages"][0].pop("forward_time"), "stage 0: missing 'forward_time'"),
        (lambda d: d["stages"][1].update(backward_time=-1.0), "stage 1: backward_time must be"),
        (lambda d: d["stages"][0].update(update_time=-0.1), "update_time must be"),
        (lambda d: d["stages"][0].update(weight_bytes=-5), "weight_bytes must be"),
        (lambda d: d["stages"][0].update(weight_bytes=1.5), "weight_bytes must be"),
        (lambda d: d["stages"][0].update(colour="red"), "unknown keys ['colour']"),
        (lambda d: d.update(link={"bandwidth": 0}), "bandwidth must be > 0"),
        (lambda d: d.update(link={"latency": -1}), "latency must be"),
        (lambda d: d.update(format="other"), "expected 'timeprest-costs'"),
    ],
)
def test_cost_model_rejects_bad_files(tmp_path, mutate, message):
    data = CostModel.uniform(2).to_json()
    mutate(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        CostModel.load(path)
    assert message in str(exc.value) and "c.json" in str(exc.value)


def test_cost_model_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CostModel.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "stages": [')
    with pytest.raises(ConfigError, match="not valid JSON"):
        CostModel.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        CostModel.load(bad)


def test_stage_cost_rejects_zero_and_nan_times():
    with pytest.raises(ConfigError, match="forward_time"):
        StageCost(forward_time=0.0, backward_time=1.0)
    with pytest.raises(ConfigError, match="backward_time"):
        StageCost(forward_time=1.0, backward_time=float("nan"))


def test_message_overhead_adds_to_the_stages_that_send_or_receive():
    cm = replace(CostModel.uniform(3, 1.0, 2.0, 0.25), overhead=0.5)
    costs = cm.to_costs()
    # stage 0 and 2 have one neighbour, stage 1 two; one message each per micro-batch
    assert costs.forward == (1.5, 2.0, 1.5) and costs.backward == (2.5, 3.0, 2.5)
    assert costs.comm == (0.25, 0.25)
    assert CostModel.from_json(cm.to_json()) == cm
    with pytest.raises(ConfigError, match="message overhead"):
        replace(cm, overhead=-1.0)
    # a pipeline's time per mini-batch grows with it: 1f1b at unit costs, W=3, N=3
    base = simulate("1f1b", 3, 3, 6, CostModel.uniform(3, 1.0, 2.0)).time_per_minibatch
    slower = simulate("1f1b", 3, 3, 6, replace(CostModel.uniform(3, 1.0, 2.0), overhead=0.5))
    assert slower.time_per_minibatch > base


def test_uniform_or_file_reads_a_file_of_the_right_size(tmp_path):
    cm = uniform_or_file(2, None, 1.0, 3.0, 0.5, weight_bytes=7)
    assert cm == CostModel.uniform(2, 1.0, 3.0, 0.5, weight_bytes=7)
    path = tmp_path / "costs.json"
    CostModel.uniform(3, 2.0, 4.0).save(path)
    assert uniform_or_file(3, path, 1.0, 2.0, 0.0) == CostModel.uniform(3, 2.0, 4.0)
    with pytest.raises(ConfigError, match="describes 3 stages but --stages is 2"):
        uniform_or_file(2, path, 1.0, 2.0, 0.0)


def test_stage_costs_needs_lists_of_one_length():
    assert [c.forward_time for c in stage_costs([1.0, 2.0], [3.0, 4.0])] == [1.0, 2.0]
    with pytest.raises(ConfigError, match="needs 2 entries"):
        stage_costs([1.0, 2.0], [3.0], weight_bytes=[1, 2])
