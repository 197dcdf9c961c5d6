"""stage/step.py: the out-of-place SGD step of a stashing update is torch's SGD, bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import timeprest
from timeprest.stage import step as step_module
from timeprest.stage.step import sgd_into
from timeprest.versions import BufferPool

SETTINGS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.01), (False, True)
    )  # fmt: skip
    if not (n and (m == 0 or d != 0))  # torch: Nesterov needs momentum and no dampening
]


def params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]


@pytest.mark.parametrize("into", [True, False], ids=["into-pool", "in-place"])
@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_sgd_into_is_torchs_step(settings, into: bool) -> None:
    ours, theirs = params(), params()
    opt_ours = torch.optim.SGD(ours, lr=0.1, **settings)
    opt_theirs = torch.optim.SGD(theirs, lr=0.1, **settings)
    pool = BufferPool()
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
        grads[2] = None if step == 1 else grads[2]  # a parameter without a gradient
        for a, b, gr in zip(ours, theirs, grads):
            a.grad = gr
            b.grad = None if gr is None else gr.clone()
        old = [p.detach().clone() for p in ours]
        storage = [p.data_ptr() for p in ours]
        fresh = sgd_into(opt_ours, ours, pool if into else None)
        assert fresh is not None
        if into:
            assert all(torch.equal(p, o) for p, o in zip(ours, old))  # untouched
            for p, f in zip(ours, fresh):
                p.data = f
        else:
            assert fresh == [] and [p.data_ptr() for p in ours] == storage  # in place
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), (step, settings)
        for a, b in zip(ours, theirs):
            bufs = (
                opt_ours.state[a].get("momentum_buffer"),
                opt_theirs.state[b].get("momentum_buffer"),
            )
            assert (bufs[0] is None) == (bufs[1] is None)
            if bufs[0] is not None:
                assert torch.equal(bufs[0], bufs[1])


def test_only_plain_sgd_is_stepped_out_of_place() -> None:
    pool = BufferPool()
    ps = params()
    for p in ps:
        p.grad = torch.ones_like(p)
    assert sgd_into(torch.optim.Adam(ps), ps, pool) is None
    hooked = torch.optim.SGD(ps, lr=0.1)
    hooked.register_step_post_hook(lambda *a: None)
    assert sgd_into(hooked, ps, pool) is None
    wrapped = torch.optim.SGD(ps, lr=0.1)
    wrapped.step = wrapped.step  # an instance's own step (an LR scheduler's wrapper, say)
    assert sgd_into(wrapped, ps, pool) is None
    cleared = torch.optim.SGD(ps, lr=0.1)
    cleared.zero_grad = cleared.zero_grad  # its own zero_grad: stepped by torch, cleared by it
    assert sgd_into(cleared, ps, pool) is None
    assert sgd_into(torch.optim.SGD(ps, lr=torch.tensor(0.1)), ps, pool) is None
    assert sgd_into(torch.optim.SGD(ps, lr=0.1), ps, pool) is not None


def train_small(method: str, **sgd: float) -> tuple[list[float], list[torch.Tensor]]:
    """Losses and final weights of a 3-stage tanh model trained with SGD(**sgd), N = 3."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)) for _ in range(7)]
    pipe = timeprest.Pipeline(
        stages,
        method=method,
        num_microbatches=3,
        optimizer=lambda p: torch.optim.SGD(p, **sgd),
        loss_fn=nn.functional.mse_loss,
    )
    losses = pipe.train(batches)
    return losses, [p.detach().clone() for r in pipe.runners for p in r.params]


@pytest.mark.parametrize("method", ["pipedream", "i-timeprest", "pipedream-2bw", "v-timeprest"])
def test_sgd_steps_train_the_same_as_torchs(monkeypatch, method) -> None:
    # stashing updates (out of place, no copy) and the others (in place), against
    # torch's own step after a copy
    def run() -> tuple[list[float], list[torch.Tensor]]:
        return train_small(method, lr=0.05, momentum=0.9, weight_decay=1e-3)

    calls = []
    real = step_module.sgd_into

    def counted(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(step_module, "sgd_into", counted)
    got = run()
    assert calls and all(calls)  # every update took our step
    monkeypatch.setattr(step_module, "sgd_into", lambda *args: None)  # torch's step
    want = run()
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_a_plain_sgd_step_clears_every_gradient_of_the_optimizer(monkeypatch) -> None:
    """Without torch's zero_grad the step clears what zero_grad(set_to_none=True) would:
    the gradients of every parameter the optimizer holds, not only the stage's; a
    zero_grad patched on the class is called (torch's path)."""
    from timeprest.policy.methods import get_method
    from timeprest.stage.remedies import StageRemedies
    from timeprest.stage.step import step_in_place

    def step(opt: torch.optim.Optimizer, ps: list[nn.Parameter]) -> None:
        grads: list[torch.Tensor | None] = [torch.ones_like(p) for p in ps]
        step_in_place(opt, ps, grads, None, StageRemedies(get_method("gpipe").policy, ps, opt))

    def not_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("the plain SGD path called zero_grad")

    # the fast path's own check passes (the class's zero_grad is the one it stands in for),
    # yet calling it would raise: the path must clear the gradients itself
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", not_called)
    monkeypatch.setattr(step_module, "_TORCH_ZERO_GRAD", not_called)
    ps, other = params(), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([*ps, other], lr=0.1)
    other.grad = torch.ones(2)
    before = [p.detach().clone() for p in ps]
    step(opt, ps)
    assert all(p.grad is None for p in [*ps, other])
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b - 0.1)
    # patched on the class: torch's step, then the patched zero_grad
    calls: list[bool] = []
    monkeypatch.setattr(
        torch.optim.SGD,
        "zero_grad",
        lambda self, set_to_none=True: calls.append(set_to_none),
        raising=False,
    )
    step(opt, ps)
    assert calls == [True]


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_a_stashing_step_may_write_into_the_spent_gradients(settings) -> None:
    """With spend_grads, a step that is the gradient itself (plain SGD) writes the new
    weights into the gradient, and the pool tensor it would have written goes; the others
    take pool tensors as before. The numbers are torch's either way, and either way the
    pool has one tensor fewer per parameter (not two)."""
    ours, theirs = params(), params()
    opt_ours = torch.optim.SGD(ours, lr=0.1, **settings)
    opt_theirs = torch.optim.SGD(theirs, lr=0.1, **settings)
    spends = settings["momentum"] == 0 and settings["weight_decay"] == 0
    spends = spends and not settings["maximize"]
    pool = BufferPool()
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        pool.give([torch.empty(5, 3) for _ in range(6)])  # as released versions would
        grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
        for a, b, gr in zip(ours, theirs, grads):
            a.grad, b.grad = gr, gr.clone()
        fresh = sgd_into(opt_ours, ours, pool, spend_grads=True)
        assert fresh is not None
        assert [f is gr for f, gr in zip(fresh, grads)] == [spends] * 3
        assert pool.bytes == 3 * 5 * 3 * 4 * (step + 1)  # one out per parameter
        for p, f in zip(ours, fresh):
            p.data = f
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), (step, settings)


def test_a_gradient_laid_out_unlike_its_weight_is_not_spent() -> None:
    ps = params()
    opt = torch.optim.SGD(ps, lr=0.1)
    grads = [torch.randn(3, 5).t() for _ in ps]  # transposed: other strides
    for p, gr in zip(ps, grads):
        p.grad = gr
    fresh = sgd_into(opt, ps, BufferPool(), spend_grads=True)
    assert fresh is not None and not any(f is gr for f, gr in zip(fresh, grads))


@pytest.mark.parametrize(
    ("method", "spends"),
    [("pipedream", True), ("pipedream-2bw", True), ("i-timeprest", True), ("v-timeprest", False)],
)
def test_stashing_plain_sgd_trains_the_same_writing_into_its_gradients(
    monkeypatch, method, spends
) -> None:
    """A stage's stashing updates with momentum-free SGD write the new weights into the
    accumulated gradients: the same training as torch's step after a copy (v-timeprest
    stashes nothing)."""

    spent = []
    real = step_module.sgd_into

    def counted(optimizer, ps, pool, spend_grads=False):
        grads = [p.grad for p in ps]
        out = real(optimizer, ps, pool, spend_grads)
        spent.append(out is not None and any(o is gr for o, gr in zip(out, grads)))
        return out

    monkeypatch.setattr(step_module, "sgd_into", counted)
    got = train_small(method, lr=0.05)
    assert any(spent) == spends  # the stashing updates wrote into their gradients
    monkeypatch.setattr(step_module, "sgd_into", lambda *args: None)  # torch's step
    want = train_small(method, lr=0.05)
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_gradients_sharing_storage_are_not_spent() -> None:
    """Two gradients on one storage (not views: each laid out as its parameter, no base):
    writing one parameter's new weights into its gradient would change the other's step,
    so none is written into."""
    ps = params()
    flat = torch.randn(2 * 5 * 3)
    grads = [torch.empty(0).set_(flat.untyped_storage(), k * 15, (5, 3), (3, 1)) for k in (0, 1)]
    grads.append(torch.randn(5, 3))
    assert all(g._base is None for g in grads)
    want = [torch.add(p.detach(), g, alpha=-0.1) for p, g in zip(ps, grads)]
    for p, gr in zip(ps, grads):
        p.grad = gr
    fresh = sgd_into(torch.optim.SGD(ps, lr=0.1), ps, BufferPool(), spend_grads=True)
    assert fresh is not None and not any(f is gr for f, gr in zip(fresh, grads))
    assert all(torch.equal(f, w) for f, w in zip(fresh, want))
