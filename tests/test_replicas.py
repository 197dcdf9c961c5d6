"""Data-parallel replicas in the emulator (docs/design.md section 10) and their arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import timeprest
from helpers import flat, regression_batches, tanh_mlp_stages
from timeprest.errors import ConfigError
from timeprest.stage.replicas import (
    combine_gradients,
    combine_losses,
    part_weights,
    replica_part,
    replica_seed,
)


def pipeline(data_parallel: int, method: str = "v-timeprest", **kw) -> timeprest.Pipeline:
    return timeprest.Pipeline(
        tanh_mlp_stages(3),
        method=method,
        num_microbatches=3,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        loss_fn=torch.nn.functional.mse_loss,
        data_parallel=data_parallel,
        **kw,
    )


def test_combination_is_row_weighted_in_replica_order() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    out = combine_gradients([[a, None, None], [b, b, None]], [0.75, 0.25])
    assert torch.equal(out[0], a * 0.75 + b * 0.25)
    assert torch.equal(out[1], b * 0.25)  # no gradient on replica 0 counts as zero
    assert out[2] is None  # none on any replica: the optimizer skips the parameter
    assert part_weights(7, 2) == [4 / 7, 3 / 7]
    assert combine_losses([2.0, 4.0], [4 / 7, 3 / 7]) == 0.0 + 4 / 7 * 2.0 + 3 / 7 * 4.0
    x, y = torch.arange(7.0), torch.arange(7.0) * 2
    assert torch.equal(replica_part((x, y), 1, 2)[0], torch.tensor([4.0, 5.0, 6.0]))
    assert replica_seed(5, 0) == 5 and replica_seed(5, 1) != replica_seed(5, 2)


# dc-asgd: refused with replicas for now (tests/test_remedies.py)
@pytest.mark.parametrize("method", [m for m in timeprest.METHODS if m != "dc-asgd"])
@pytest.mark.parametrize("data_parallel", [2, 3])
def test_replicas_equal_one_pipeline_on_the_whole_minibatch(
    method: str, data_parallel: int
) -> None:
    batches = regression_batches(num=5, rows=13)
    one = pipeline(1, method)
    many = pipeline(data_parallel, method)
    seen: list[tuple[int, float]] = []
    want = one.train(batches)
    got = many.train(batches, on_loss=lambda t, loss: seen.append((t, loss)))
    assert max(abs(a - b) for a, b in zip(want, got)) < 1e-10
    assert seen == list(enumerate(got))  # the whole mini-batch's loss, as soon as known
    assert torch.allclose(flat(one.stages), flat(many.stages), rtol=0, atol=1e-10)
    # every replica holds the same weights and versions: they step in lockstep
    for replica in many._replicas:
        assert torch.equal(flat([r.module for r in replica]), flat(many.stages))
        assert [r.store.latest for r in replica] == [5, 5, 5]
    assert many._replicas[0][0].seed != many.runners[0].seed  # own dropout masks
    assert many.report.stages == [r.report() for r in many.runners]  # replica 0's figures


def test_replicas_stream_an_iterator_of_known_length() -> None:
    batches = regression_batches(num=4, rows=8)
    listed = pipeline(2).train(batches)
    streamed = pipeline(2).train(iter(batches), num_minibatches=4)
    assert listed == streamed


def test_too_few_rows_and_bad_counts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="fewer than the 2 replicas x 3 micro-batches"):
        pipeline(2).train(regression_batches(num=2, rows=5))
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="data_parallel must be an integer >= 1"):
            pipeline(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device_mesh is for engine='distributed'"):
        pipeline(2, device_mesh=object())


def test_checkpoint_resumes_bitwise_and_loads_with_another_d(tmp_path: Path) -> None:
    epoch = regression_batches(num=3, rows=10)
    whole = pipeline(2)
    whole.train(epoch)
    want = whole.train(epoch)
    first = pipeline(2)
    first.train(epoch)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = pipeline(2)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.train(epoch) == want
    assert torch.equal(flat(resumed.stages), flat(whole.stages))
    assert torch.equal(flat([r.module for r in resumed._replicas[0]]), flat(whole.stages))
    # one copy per stage: the same state whatever D the loading pipeline has
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("stage*.pt")) == [
        "stage0.pt",
        "stage1.pt",
        "stage2.pt",
    ]
    for d in (1, 3):
        other = pipeline(d)
        other.load_checkpoint(tmp_path / "ckpt")
        assert other.minibatches_done == 3
        for replica in [other.runners, *other._replicas]:
            assert torch.equal(flat([r.module for r in replica]), flat(first.stages))
