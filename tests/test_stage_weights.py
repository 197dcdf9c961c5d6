"""The weight swap and the saved-tensor tokens behind a backward on other weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import timeprest
import timeprest.stage.runner as runner_module
from helpers import alive_tensors, regression_batches, sgd, tanh_mlp_stages
from timeprest.stage.weights import Saved, call_with, parameter_slots, weight_tokens


def test_call_with_runs_on_the_given_weights_and_restores_the_parameters() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    params = list(lin.parameters())
    slots = parameter_slots(lin, params)
    w = [torch.zeros_like(p) for p in params]
    out = call_with(lin, slots, params, w, torch.ones(4, 3))
    assert torch.equal(out, torch.zeros(4, 2))
    assert [id(p) for p in lin.parameters()] == [id(p) for p in params]


def test_tied_weights_have_two_slots() -> None:
    a = nn.Linear(2, 2, bias=False)
    model = nn.Sequential(a, nn.Tanh(), a)
    slots = parameter_slots(model, [a.weight])
    assert len(slots[0]) == 1  # one module object, reached twice, holds it once
    b = nn.Linear(2, 2, bias=False)
    b.weight = a.weight
    slots = parameter_slots(nn.Sequential(a, b), [a.weight])
    assert len(slots[0]) == 2


def test_tokens_make_the_backward_read_other_weights() -> None:
    """y = x W^T: with tokens, dx = dy W_b (backward weights) and dW = dy^T x (saved x)."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    params = list(lin.parameters())
    slots = parameter_slots(lin, params)
    x = torch.randn(4, 3, requires_grad=True)
    w_fwd = params[0].detach().clone().requires_grad_()
    w_bwd = torch.randn(2, 3)
    saved = Saved(x, None, [w_fwd], 0, 0)
    with torch.autograd.graph.saved_tensors_hooks(*weight_tokens(saved, lin)):
        y = call_with(lin, slots, params, [w_fwd], x)
    saved.backward_weights = [w_bwd]
    dy = torch.randn(4, 2)
    dx, dw = torch.autograd.grad(y, [x, w_fwd], dy)
    assert torch.allclose(dx, dy @ w_bwd)
    assert torch.allclose(dw, dy.T @ x.detach())
    assert saved.activation_bytes == x.numel() * x.element_size()  # x counted, the weight not


def train(method, *, tokens_everywhere=False, num=6, dtype=torch.float64, **kw):
    """A 3-stage tanh MLP trained on ``num`` mini-batches of N = 2; ``tokens_everywhere``
    makes every forward take the tokens, as a module with buffers does."""
    kw.setdefault("optimizer", sgd(0.1))
    pipe = timeprest.Pipeline(
        tanh_mlp_stages(3, dtype=dtype), method=method, num_microbatches=2,
        loss_fn=torch.nn.functional.mse_loss, **kw,
    )  # fmt: skip
    for r in pipe.runners:
        r._has_buffers = tokens_everywhere
    pipe.train(regression_batches(num=num, dtype=dtype))
    return pipe


@pytest.fixture
def token_forwards(monkeypatch):
    """The forward version of every forward that takes the tokens, in order."""
    calls = []
    real = runner_module.weight_tokens

    def counting(saved, module, reads=None, **kw):
        calls.append(saved.version)
        return real(saved, module, reads, **kw)

    monkeypatch.setattr(runner_module, "weight_tokens", counting)
    return calls


def test_forwards_without_tokens_train_and_count_as_with_them() -> None:
    """Forwards whose backward reads their own weights (d = 0) run without the saved-tensor
    tokens: the same bits and the same saved-activation figures as with tokens everywhere
    (forced here as a module with buffers does), for a flush and an asynchronous method."""
    for method in ("gpipe", "pipedream", "v-timeprest", "i-timeprest"):
        plain, tokens = (train(method, tokens_everywhere=f, num=5) for f in (False, True))
        for a, b in zip(plain.runners, tokens.runners):
            assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))
            assert a.report() == b.report() and a.report().peak_activation_bytes > 0
        assert [m.loss for m in plain.report.minibatches] == [
            m.loss for m in tokens.report.minibatches
        ]


def test_only_blended_backwards_need_tokens(token_forwards) -> None:
    """V-TiMePReSt's stale forwards read the live weights and their backwards the latest
    ones, which autograd then holds anyway; PipeDream's read the version the forward read,
    whose tensors its stash keeps: only each stage's first forward (counting its saved
    bytes) takes tokens. I-TiMePReSt's backwards read a blend: tokens at every stale one."""
    for method, first_only in (("v-timeprest", True), ("pipedream", True), ("i-timeprest", False)):
        token_forwards.clear()
        pipe = train(method)
        stale = [d for m in pipe.report.minibatches for d in m.stages[0].staleness if d > 0]
        assert stale  # stage 0 ran stale forwards
        assert (len(token_forwards) == 3) == first_only


def test_under_autocast_every_forward_takes_tokens(token_forwards) -> None:
    """Under bf16 autograd would keep a cast of every weight: the tokens stay on, d = 0 too
    (else each micro-batch in flight would hold its own half-precision weight copy)."""
    train("gpipe", num=3, dtype=torch.float32, precision="bf16")
    assert len(token_forwards) == 3 * 3 * 2  # every forward of every stage


def test_an_optimizer_that_rebinds_data_trains_as_one_that_updates_in_place() -> None:
    """Forwards without tokens hold the live storage; an optimizer that assigns p.data
    instead of updating in place has its values put back into that storage, so the
    result equals the one with tokens everywhere (V-TiMePReSt and PipeDream)."""

    class Rebind(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data = p.data - group["lr"] * p.grad

    for method in ("v-timeprest", "pipedream"):
        plain, tokens = (
            train(method, tokens_everywhere=f, optimizer=lambda ps: Rebind(ps, 0.1))
            for f in (False, True)
        )
        for a, b in zip(plain.runners, tokens.runners):
            assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))


def test_a_failed_run_leaves_no_forward_behind() -> None:
    """A forward whose backward never runs (the run failed first) is freed with its pipeline:
    the tokens' closures hold the forward's record only weakly, and an activation is saved
    detached, so no cycle through autograd's C++ side (which no collection frees) keeps
    its graph and weights."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(24, 23), nn.ReLU(), nn.Linear(23, 24)) for _ in range(2)]
    good = (torch.randn(8, 24), torch.randn(8, 24))
    bad = (torch.full((8, 24), float("nan")), torch.randn(8, 24))
    before = alive_tensors((23, 24))
    for method in ("i-timeprest", "pipedream-2bw", "timeprest"):  # forwards with tokens
        pipe = timeprest.Pipeline(
            stages, method=method, num_microbatches=4, optimizer=sgd(0.01),
            loss_fn=nn.functional.mse_loss,
        )  # fmt: skip
        with pytest.raises(timeprest.NonFiniteLossError):
            pipe.train([good, good, bad, good, good])
        del pipe
        assert alive_tensors((23, 24)) == before, method


@pytest.mark.parametrize("method", ["1f1b", "pipedream"])
def test_parameters_moved_between_calls_are_read_where_they_now_are(method) -> None:
    """The store keeps detached views of the live parameters for a schedule; parameters
    moved to other storage between two ``train`` calls (as ``module.to`` or loading a
    checkpoint may) are read there: the same bits as a pipeline whose parameters stayed."""

    def pipe():
        return timeprest.Pipeline(
            tanh_mlp_stages(3), method=method, num_microbatches=2, optimizer=sgd(0.1),
            loss_fn=torch.nn.functional.mse_loss,
        )  # fmt: skip

    stayed, moved = pipe(), pipe()
    for p in (stayed, moved):
        p.train(regression_batches(num=3))
    for r in moved.runners:
        for prm in r.params:
            prm.data = prm.data.clone()
    for p in (stayed, moved):
        p.train(regression_batches(num=4, seed=2))
    for a, b in zip(stayed.runners, moved.runners):
        assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))


def test_buffers_replaced_between_calls_are_still_kept_by_reference() -> None:
    """A BatchNorm whose running statistics were replaced by new tensors between two
    ``train`` calls: the weight tokens know the new buffers (kept by reference, not
    counted as saved activations), so the figures and the numbers are those of a
    pipeline whose buffers stayed."""
    torch.manual_seed(0)
    base = [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh()), nn.Linear(8, 2)]
    pipes = [
        timeprest.Pipeline(
            [copy.deepcopy(m).double() for m in base],
            method="pipedream",
            num_microbatches=1,
            optimizer=sgd(0.1),
            loss_fn=torch.nn.functional.mse_loss,
        )
        for _ in range(2)
    ]
    for p in pipes:
        p.train(regression_batches(num=3))
    bn_new, bn_same = (p.runners[0].module[1] for p in pipes)
    bn_new.running_mean = bn_new.running_mean.clone()
    bn_new.running_var = bn_new.running_var.clone()
    for p in pipes:
        p.train(regression_batches(num=4, seed=2))
    assert torch.equal(bn_new.running_mean, bn_same.running_mean)
    assert [r.peak_activation_bytes for r in pipes[0].runners] == [
        r.peak_activation_bytes for r in pipes[1].runners
    ]
    for a, b in zip(*(p.runners for p in pipes)):
        assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))


class _Scaled(nn.Module):
    """Linear, times a buffer that the forward itself changes: by a new tensor each time
    (``replace``) or in place."""

    def __init__(self, replace: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.register_buffer("scale", torch.ones(8))
        self.replace = replace

    def forward(self, x):
        y = self.lin(x) * self.scale  # autograd saves the buffer
        with torch.no_grad():
            if self.replace:
                self.scale = self.scale * 0.99 + 0.01
            else:
                self.scale.mul_(0.99).add_(0.01)
        return torch.tanh(y)


@pytest.mark.parametrize("method", ["1f1b", "pipedream"])
def test_a_buffer_the_forward_replaces_is_still_kept_by_reference(method) -> None:
    """The weight tokens read the module's buffers as they are at each forward: one the
    forward replaces by a new tensor is kept by reference, not counted as a saved
    activation, the same figures and numbers as a buffer changed in place."""
    pipes = []
    for replace in (True, False):
        torch.manual_seed(0)
        stages = [_Scaled(replace).double(), nn.Linear(8, 2).double()]
        pipe = timeprest.Pipeline(
            stages, method=method, num_microbatches=4, optimizer=sgd(0.1),
            loss_fn=torch.nn.functional.mse_loss,
        )  # fmt: skip
        pipe.train(regression_batches(num=4, rows=16))
        pipes.append(pipe)
    replaced, in_place = pipes
    assert [r.peak_activation_bytes for r in replaced.runners] == [
        r.peak_activation_bytes for r in in_place.runners
    ]
    for a, b in zip(replaced.runners, in_place.runners):
        assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
