"""Bad input: each a typed error with a message that names the values and the fix."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import timeprest
from helpers import regression_batches, sgd, tanh_mlp_stages
from timeprest.errors import (
    ConfigError,
    MultipleSequenceWarning,
    NonFiniteLossError,
    ShapeError,
)

MSE = torch.nn.functional.mse_loss


def pipe(stages, method="v-timeprest", n=2, **kw):
    return timeprest.Pipeline(
        stages, method=method, num_microbatches=n, optimizer=sgd(), loss_fn=MSE, **kw
    )


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        pipe(tanh_mlp_stages(2), method="pipedreamer")
    msg = str(err.value)
    assert "pipedreamer" in msg
    for m in timeprest.METHODS:
        assert m in msg


@pytest.mark.parametrize("n", [0, -1])
def test_microbatches_below_one(n):
    with pytest.raises(ConfigError, match="num_microbatches must be an integer >= 1"):
        pipe(tanh_mlp_stages(2), n=n)


def test_empty_stage_list():
    with pytest.raises(ConfigError, match="stage list is empty"):
        pipe([])


def test_stage_list_of_wrong_things():
    with pytest.raises(ConfigError, match="list of nn.Module"):
        pipe(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="stage 1 is a str"):
        pipe([nn.Linear(2, 2), "oops"])


def test_missing_optimizer_or_loss():
    with pytest.raises(ConfigError, match="optimizer is required"):
        timeprest.Pipeline(tanh_mlp_stages(2), loss_fn=MSE)
    with pytest.raises(ConfigError, match="loss_fn is required"):
        timeprest.Pipeline(tanh_mlp_stages(2), optimizer=sgd())


def test_shape_mismatch_names_both_stages():
    stages = [nn.Linear(4, 8).double(), nn.Linear(5, 2).double()]
    with pytest.raises(
        ShapeError, match=r"stage 1 cannot consume the output of stage 0 \(shape \(4, 8\)"
    ):
        pipe(stages).train(regression_batches(num=2))


def test_input_mismatch_at_stage_zero():
    stages = [nn.Linear(3, 8).double(), nn.Linear(8, 2).double()]
    with pytest.raises(ShapeError, match="stage 0 cannot consume the input batch"):
        pipe(stages).train(regression_batches(num=2))


def test_loss_shape_mismatch():
    stages = [nn.Linear(4, 8).double(), nn.Linear(8, 3).double()]
    with pytest.raises(ShapeError, match="loss_fn failed on the output of stage 1"):
        pipe(stages, n=2).train(
            [(x, y[:, :1].expand(-1, 5).contiguous()) for x, y in regression_batches(num=2)]
        )


def test_non_finite_loss_stops_and_names_the_minibatch():
    batches = regression_batches(num=5)
    x, y = batches[3]
    batches[3] = (x, y * math.nan)
    with pytest.raises(NonFiniteLossError, match="mini-batch 3"):
        pipe(tanh_mlp_stages(3)).train(batches)


def test_diverging_training_is_stopped():
    batches = [(x * 1e3, y) for x, y in regression_batches(num=40)]
    with pytest.raises(NonFiniteLossError, match="lower learning rate"):
        timeprest.Pipeline(
            tanh_mlp_stages(2),
            method="gpipe",
            num_microbatches=1,
            optimizer=sgd(lr=1e6),
            loss_fn=MSE,
        ).train(batches)


def test_more_microbatches_than_rows():
    with pytest.raises(
        ConfigError, match="mini-batch 0 has 3 rows, fewer than the 4 micro-batches"
    ):
        pipe(tanh_mlp_stages(2), n=4).train(regression_batches(num=2, rows=3))


def test_malformed_batches():
    with pytest.raises(ConfigError, match="not an \\(input, target\\) pair"):
        pipe(tanh_mlp_stages(2)).train([torch.zeros(4, 4)])
    with pytest.raises(ConfigError, match="input has 4 rows but target has 3"):
        pipe(tanh_mlp_stages(2)).train([(torch.zeros(4, 4), torch.zeros(3, 2))])


def test_2bw_needs_n_at_least_w():
    with pytest.raises(ConfigError, match="N=2, W=3"):
        pipe(tanh_mlp_stages(3), method="pipedream-2bw", n=2)


def test_previous_forward_needs_2bw():
    with pytest.raises(ConfigError, match="'previous' needs the 2bw schedule"):
        pipe(tanh_mlp_stages(3), forward="previous")


def test_nf1b_with_too_few_microbatches_warns():
    with pytest.warns(MultipleSequenceWarning, match="multiple-sequence problem"):
        pipe(tanh_mlp_stages(4), method="i-timeprest", n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(tanh_mlp_stages(4), method="i-timeprest", n=3)
        pipe(tanh_mlp_stages(4), method="pipedream", n=1)  # PipeDream's own design


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"forward": "sideways"}, "unknown forward rule"),
        ({"backward": "oldest"}, "unknown backward rule"),
        ({"grad_rule": "magic"}, "unknown gradient rule"),
        ({"significance": "cubic"}, "unknown significance"),
        ({"decay": -1.0}, "decay"),
        ({"schedule": "zigzag"}, "unknown schedule"),
        ({"engine": "cloud"}, "unknown engine"),
        ({"costs": "cheap"}, "unknown costs"),
    ],
)
def test_bad_overrides(kw, match):
    with pytest.raises(ConfigError, match=match):
        pipe(tanh_mlp_stages(3), n=3, **kw)


def test_significance_callable_out_of_range():
    p = pipe(tanh_mlp_stages(3), method="i-timeprest", n=3, significance=lambda d: 2.0)
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\]"):
        p.train(regression_batches(num=6))
