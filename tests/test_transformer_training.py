"""docs/design.md section 11 on a split GPT: tied embeddings, gradient clipping, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timeprest import Pipeline, split
from timeprest.errors import ConfigError, NonFiniteLossError
from timeprest.models.gpt import gpt, lm_loss
from timeprest.splitting import SplitPlan, apply_plan_untied, plan_split
from timeprest.stage.weights import Saved, weight_tokens

LR = 0.5
COUNTS = {2: [2, 2], 3: [1, 2, 1]}


def model(tie: bool) -> nn.Module:
    torch.manual_seed(0)
    return gpt(block_size=8, n_layer=2, n_head=2, n_embd=8, tie_embeddings=tie).double()


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 256, (4, 9), generator=g) for _ in range(count)]
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def stages_of(m: nn.Module, w: int) -> tuple[list[nn.Module], list[tuple[tuple[int, str], ...]]]:
    plan: SplitPlan = plan_split(m, w, COUNTS[w])
    return apply_plan_untied(m, plan)


def plain(m: nn.Module, data, clip=None, groups=None) -> nn.Module:
    """Plain SGD on the unsplit model; ``clip`` bounds the norm of each of ``groups``."""
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    for x, y in data:
        opt.zero_grad()
        lm_loss(m(x), y).backward()
        if clip is not None:
            for group in groups or [list(m.parameters())]:
                torch.nn.utils.clip_grad_norm_(group, clip)
        opt.step()
    return m


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("w", [2, 3])
@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
def test_flush_schedules_equal_plain_training(method: str, w: int, tie: bool) -> None:
    data = batches()
    ref = plain(model(tie), data)
    split_model = model(tie)
    stages, tied = stages_of(split_model, w)
    assert len(tied) == (1 if tie else 0)
    if tie:
        ((first, last),) = tied
        assert first == (0, "0.tok.weight") and last[0] == w - 1
    pipe = Pipeline(stages, method=method, num_microbatches=2, optimizer=sgd, loss_fn=lm_loss,
                    tied=tied)  # fmt: skip
    for batch in data:  # one update per call: the copies are compared after each
        pipe.train([batch])
        if tie:
            a = stages[0].get_parameter("0.tok.weight")
            b = stages[-1].get_parameter(tied[0][1][1])
            assert a is not b and torch.equal(a, b)
    ref_state, got = ref.state_dict(), split_model.state_dict()
    for key, value in ref_state.items():
        assert torch.allclose(got[key], value, rtol=0, atol=1e-10), key


def test_tied_embeddings_refuse_asynchronous_schedules() -> None:
    stages, tied = stages_of(model(True), 2)
    with pytest.raises(ConfigError, match=r"tied tensor 0.tok.weight of stage 0 and .* stage 1"):
        Pipeline(stages, method="pipedream", optimizer=sgd, loss_fn=lm_loss, tied=tied)


@pytest.mark.parametrize("method", ["gpipe", "1f1b", "v-timeprest", "pipedream"])
def test_per_stage_clipping_equals_clip_grad_norm_of_each_stage(method: str) -> None:
    data, clip = batches(1), 0.05
    ref_model = model(False)
    ref_stages, _ = stages_of(ref_model, 2)  # shares the model's parameters
    groups = [list(s.parameters()) for s in ref_stages]
    ref_model.zero_grad()
    lm_loss(ref_model(data[0][0]), data[0][1]).backward()
    assert all(torch.nn.utils.get_total_norm([p.grad for p in g]) > clip for g in groups)
    ref = model(False)
    ref_groups = [list(s.parameters()) for s in stages_of(ref, 2)[0]]
    plain(ref, data, clip, ref_groups)
    stages, _ = stages_of(model(False), 2)
    pipe = Pipeline(stages, method=method, num_microbatches=2, optimizer=sgd, loss_fn=lm_loss,
                    clip_grad_norm=clip)  # fmt: skip
    pipe.train(data)  # one mini-batch: every method's first update uses the initial weights
    for got, want in zip(stages, stages_of(ref, 2)[0]):
        for a, b in zip(got.parameters(), want.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tie", [False, True])
def test_global_clipping_equals_clip_grad_norm_of_the_model(tie: bool) -> None:
    data, clip = batches(), 0.05
    ref = plain(model(tie), data, clip)
    split_model = model(tie)
    stages, tied = stages_of(split_model, 3)
    pipe = Pipeline(stages, method="gpipe", num_microbatches=2, optimizer=sgd, loss_fn=lm_loss,
                    clip_grad_norm=clip, clip_scope="global", tied=tied)  # fmt: skip
    pipe.train(data)
    for key, value in ref.state_dict().items():
        assert torch.allclose(split_model.state_dict()[key], value, rtol=0, atol=1e-10), key


def test_clipping_and_precision_errors() -> None:
    stages, _ = stages_of(model(False), 2)
    with pytest.raises(ConfigError, match="global gradient clipping needs a flush schedule"):
        Pipeline(stages, method="v-timeprest", optimizer=sgd, loss_fn=lm_loss,
                 clip_grad_norm=1.0, clip_scope="global")  # fmt: skip
    with pytest.raises(ConfigError, match="power of two"):
        Pipeline(stages, method="gpipe", optimizer=sgd, loss_fn=lm_loss, precision="fp16",
                 loss_scale=1000.0)  # fmt: skip
    with pytest.raises(ConfigError, match="a loss scale is for precision fp16"):
        Pipeline(stages, method="gpipe", optimizer=sgd, loss_fn=lm_loss, loss_scale=1024.0)
    with pytest.raises(ConfigError, match="precision must be one of"):
        Pipeline(stages, method="gpipe", optimizer=sgd, loss_fn=lm_loss, precision="fp8")


def test_bf16_backward_reads_the_backward_weights() -> None:
    """Autocast saves the bf16 cast of the weight; the backward must cast the backward weights."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 5, bias=False)
    x = torch.randn(2, 3, 4, requires_grad=True)
    w_fwd, w_bwd = torch.randn(5, 4), torch.randn(5, 4)
    grad_out = torch.randn(2, 3, 5)

    def grads(backward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = w_fwd.clone().requires_grad_()
        saved = Saved(x, None, [leaf], 0, 0)
        with torch.autograd.graph.saved_tensors_hooks(*weight_tokens(saved, layer)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = nn.functional.linear(x, leaf)
        assert out.dtype == torch.bfloat16
        saved.backward_weights = [backward]
        dx, dw = torch.autograd.grad(out, [x, leaf], grad_outputs=grad_out.bfloat16())
        return dx, dw

    bf = torch.bfloat16
    dx_latest, dw_latest = grads(w_bwd)
    dx_stashed, dw_stashed = grads(w_fwd)
    assert not torch.equal(dx_latest, dx_stashed)
    assert torch.equal(dw_latest, dw_stashed)  # dW reads the saved input, not the weights
    for dx, w in ((dx_latest, w_bwd), (dx_stashed, w_fwd)):
        reference = (grad_out.to(bf) @ w.to(bf)).float()
        assert torch.equal(dx, reference)
    assert dw_latest.dtype == torch.float32  # the master weight's gradient stays float32
    assert torch.equal(
        dw_latest, (grad_out.to(bf).reshape(-1, 5).T @ x.to(bf).reshape(-1, 4)).float()
    )


def test_bf16_pipeline_trains_with_float32_state() -> None:
    torch.manual_seed(0)
    m = gpt(block_size=8, n_layer=2, n_head=2, n_embd=8)
    stages, _ = stages_of(m, 2)
    pipe = Pipeline(stages, method="pipedream", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                    loss_fn=lm_loss, precision="bf16")  # fmt: skip
    losses = pipe.train(batches(4))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for s in stages for p in s.parameters())


def test_adamw_leaves_norms_biases_and_embeddings_undecayed() -> None:
    """Language models: one AdamW per stage, two groups; the group without weight decay
    holds exactly the norm weights, the biases and the embeddings."""
    from timeprest import split
    from timeprest.train import TrainConfig
    from timeprest.train.optim import make_optimizer, no_decay_ids

    torch.manual_seed(0)
    stages = split(gpt(n_layer=2, n_head=2, n_embd=16, block_size=8), 2)
    build = make_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.1), no_decay_ids(stages))
    for stage in stages:
        opt = build([p for p in stage.parameters()])
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        for module in stage.modules():
            for name, p in module.named_parameters(recurse=False):
                exempt = isinstance(module, (nn.LayerNorm, nn.Embedding)) or name == "bias"
                assert (id(p) in plain) == exempt and (id(p) in decayed) != exempt, (module, name)


def fp16_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def fp16_plain(model: nn.Module, data, scale: float, lr: float) -> None:
    """Plain training under fp16 autocast with a static loss scale, written out."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x), y)
        (loss * scale).backward()
        for p in model.parameters():
            p.grad = p.grad / scale
        opt.step()
        opt.zero_grad(set_to_none=True)


def fp16_batches(scale: float = 1.0):
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 6, generator=g), scale * torch.randn(8, 3, generator=g)) for _ in range(4)
    ]


@pytest.mark.parametrize("method", ["gpipe", "pipedream"])
def test_fp16_with_a_static_loss_scale_equals_plain_scaled_training(method: str) -> None:
    """fp16: the last stage scales the loss, the activation gradients between stages stay
    scaled, each stage unscales its weight gradients; with one micro-batch and one stage
    that is written-out scaled training. gpipe on two stages equals it too."""
    data, scale, lr = fp16_batches(), 1024.0, 0.05
    ref = fp16_mlp()
    fp16_plain(ref, data, scale, lr)
    split_model = fp16_mlp()
    w = 2 if method == "gpipe" else 1
    stages = split(split_model, w)
    pipe = Pipeline(stages, method=method, num_microbatches=1, loss_fn=nn.functional.mse_loss,
                    optimizer=lambda p: torch.optim.SGD(p, lr=lr), precision="fp16",
                    loss_scale=scale)  # fmt: skip
    pipe.train(data)
    for a, b in zip(ref.parameters(), split_model.parameters()):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_the_loss_scale_keeps_fp16_gradients_from_underflowing() -> None:
    """Targets close to the outputs make gradients below fp16's range: unscaled they vanish,
    scaled by 2**16 they survive (and the first stage's weights move)."""
    reference = fp16_mlp()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        outputs = [reference(x).float() for x, _ in fp16_batches()]
    # the model's own fp16 outputs, shifted by 1e-7: output gradients of about 8e-9
    data = [(x, out + 1e-7) for (x, _), out in zip(fp16_batches(), outputs)]
    moved = {}
    for scale in (1.0, 65536.0):
        model = fp16_mlp()
        before = [p.detach().clone() for p in model[0].parameters()]
        pipe = Pipeline(split(model, 2), method="gpipe", num_microbatches=1,
                        loss_fn=nn.functional.mse_loss, optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                        precision="fp16", loss_scale=scale)  # fmt: skip
        pipe.train(data)
        moved[scale] = any(not torch.equal(a, b) for a, b in zip(before, model[0].parameters()))
    assert moved == {1.0: False, 65536.0: True}


def test_an_fp16_overflow_stops_with_a_clear_error() -> None:
    pipe = Pipeline(split(fp16_mlp(), 2), method="gpipe", num_microbatches=1,
                    loss_fn=nn.functional.mse_loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                    precision="fp16", loss_scale=2.0**40)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="fp16 gradients overflowed at stage 1"):
        pipe.train(fp16_batches(scale=100.0))
