"""The emulator against plain SGD and a hand-written delayed-gradient reference (docs/design.md section 9)."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from torch import nn

import timeprest
from helpers import flat, plain_sgd, regression_batches, sgd, tanh_mlp_stages
from timeprest.errors import ConfigError, MultipleSequenceWarning
from timeprest.policy import METHODS, plan_versions, resolve_policy

ALL = list(METHODS)


def make_pipe(stages, method, n, lr=0.1, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        return timeprest.Pipeline(
            stages,
            method=method,
            num_microbatches=n,
            optimizer=sgd(lr),
            loss_fn=torch.nn.functional.mse_loss,
            **kw,
        )


@pytest.mark.parametrize("method", ["gpipe", "1f1b"])
@pytest.mark.parametrize("w,n", [(2, 1), (2, 3), (3, 2), (4, 4), (3, 5)])
def test_flush_methods_equal_plain_sgd(method, w, n):
    batches = regression_batches(num=5, rows=10)
    ref = tanh_mlp_stages(w)
    ref_losses = plain_sgd(ref, batches)
    stages = tanh_mlp_stages(w)
    losses = make_pipe(stages, method, n).train(batches)
    assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(flat(stages), flat(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", [m for m in ALL if m != "pipedream-2bw"])
@pytest.mark.parametrize("n", [1, 3])
def test_one_stage_equals_plain_sgd(method, n):
    batches = regression_batches(num=5, rows=9)
    ref = tanh_mlp_stages(1)
    ref_losses = plain_sgd(ref, batches)
    stages = tanh_mlp_stages(1)
    losses = make_pipe(stages, method, n).train(batches)
    assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(flat(stages), flat(ref), rtol=1e-12, atol=1e-12)


def test_one_stage_2bw_lags_by_one_version():
    # the 2bw forward reads version t-1: at W=1 it is not plain SGD
    batches = regression_batches(num=5, rows=9)
    ref = tanh_mlp_stages(1)
    plain_sgd(ref, batches)
    stages = tanh_mlp_stages(1)
    make_pipe(stages, "pipedream-2bw", 2).train(batches)
    assert not torch.allclose(flat(stages), flat(ref))


# ---------------------------------------------------------------------------
# A hand-written delayed-gradient reference: plain loops and explicit formulas
# for Linear+Tanh layers; the only thing taken from the library is the
# per-stage program text, from which the versions are counted.
# ---------------------------------------------------------------------------


def program_versions(programs):
    """For each stage: forward version of (t, j) and the version at the backward of t."""
    fwd, bwd = [], []
    for prog in programs:
        k, f, b = 0, {}, {}
        for a in prog:
            text = str(a)
            if text[0] == "U":
                k += 1
            elif text[0] == "F":
                t, j = map(int, text[1:].split("."))
                f[(t, j)] = k
            else:
                b[int(text[1:].split(".")[0])] = k
        fwd.append(f)
        bwd.append(b)
    return fwd, bwd


def delayed_gradient_reference(
    stages, batches, programs, n, backward, lr, vertical=False, sigma=None
):
    """w_s(t+1) = w_s(t) - lr * grad_s, with the forward at the versions the program gives.

    backward="stashed": gradients at the forward versions (PipeDream);
    backward="latest": the delta is carried back through the latest weights
    (V-TiMePReSt), dW from the saved forward activations; "intermediate":
    through sigma(d) W_v + (1 - sigma(d)) W_k (I-TiMePReSt). ``vertical``:
    every stage's forward reads the version stage 0 read (TiMePReSt).
    """
    w = len(stages)
    lins = [m if isinstance(m, nn.Linear) else m[0] for m in stages]
    hist = [[(lin.weight.detach().clone(), lin.bias.detach().clone())] for lin in lins]
    fwd, bwd = program_versions(programs)
    if vertical:
        fwd = [fwd[0]] * w
    losses = []
    for t, (x, y) in enumerate(batches):
        rows = x.shape[0]
        gsum = [
            [torch.zeros_like(hist[s][-1][0]), torch.zeros_like(hist[s][-1][1])] for s in range(w)
        ]
        total = 0.0
        for j, (xj, yj) in enumerate(zip(torch.tensor_split(x, n), torch.tensor_split(y, n))):
            acts = [xj]  # input of each stage
            outs = []
            for s in range(w):
                W_, b_ = hist[s][fwd[s][(t, j)]]
                z = acts[-1] @ W_.T + b_
                h = z if s == w - 1 else torch.tanh(z)
                outs.append(h)
                acts.append(h)
            frac = xj.shape[0] / rows
            diff = outs[-1] - yj
            total += frac * float((diff**2).mean())
            delta = 2.0 * diff / diff.numel() * frac  # d loss / d output of the last stage
            for s in reversed(range(w)):
                if s < w - 1:
                    delta = delta * (1 - outs[s] ** 2)  # tanh' from the saved forward output
                v, k = fwd[s][(t, j)], bwd[s][t]
                if backward == "stashed":
                    W_b = hist[s][v][0]
                elif backward == "latest":
                    W_b = hist[s][k][0]
                else:
                    sg = sigma(k - v)
                    W_b = sg * hist[s][v][0] + (1 - sg) * hist[s][k][0]
                gsum[s][0] += delta.T @ acts[s]
                gsum[s][1] += delta.sum(0)
                delta = delta @ W_b
        losses.append(total)
        for s in range(w):
            W_, b_ = hist[s][-1]
            hist[s].append((W_ - lr * gsum[s][0], b_ - lr * gsum[s][1]))
    final = torch.cat([torch.cat([hist[s][-1][0].reshape(-1), hist[s][-1][1]]) for s in range(w)])
    return losses, final


@pytest.mark.parametrize(
    "method,n,backward",
    [
        ("pipedream", 1, "stashed"),
        ("pipedream", 2, "stashed"),
        ("v-timeprest", 1, "latest"),
        ("v-timeprest", 2, "latest"),
        ("v-timeprest", 3, "latest"),
        ("timeprest", 2, "latest"),
        ("timeprest", 3, "latest"),
        ("i-timeprest", 2, "intermediate"),
        ("i-timeprest", 3, "intermediate"),
    ],
)
def test_matches_hand_written_delayed_gradient_reference(method, n, backward):
    batches = regression_batches(num=8, rows=9)
    lr = 0.2
    stages = tanh_mlp_stages(3)
    pipe = make_pipe(stages, method, n, lr=lr, decay=0.7)
    programs = pipe.schedule_for(len(batches)).programs
    ref_losses, ref_final = delayed_gradient_reference(
        tanh_mlp_stages(3),
        batches,
        programs,
        n,
        backward,
        lr,
        vertical=method == "timeprest",
        sigma=lambda d: math.exp(-0.7 * d),
    )
    losses = pipe.train(batches)
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(flat(stages), ref_final, rtol=1e-10, atol=1e-10)


def test_pipedream_n1_versions_have_the_closed_form():
    # PipeDream: stage s runs the forward of t on version max(0, t - (W-1-s))
    w = 4
    pipe = make_pipe(tanh_mlp_stages(w), "pipedream", 1)
    fwd, bwd = program_versions(pipe.schedule_for(10).programs)
    for s in range(w):
        for t in range(10):
            assert fwd[s][(t, 0)] == max(0, t - (w - 1 - s))
            assert bwd[s][t] == t


def test_asynchronous_methods_differ_from_sync():
    batches = regression_batches(num=6)
    ref = tanh_mlp_stages(3)
    plain_sgd(ref, batches)
    for m in ("pipedream", "timeprest", "v-timeprest", "i-timeprest", "pipedream-2bw"):
        stages = tanh_mlp_stages(3)
        make_pipe(stages, m, 3).train(batches)
        assert not torch.allclose(flat(stages), flat(ref)), m


@pytest.mark.parametrize("n", [2, 3])
def test_intermediate_limits(n):
    batches = regression_batches(num=7)

    def run(method, **kw):
        stages = tanh_mlp_stages(3)
        losses = make_pipe(stages, method, n, **kw).train(batches)
        return losses, flat(stages)

    latest = run("v-timeprest")
    stashed = run("v-timeprest", backward="stashed")
    inf = run("i-timeprest", decay=math.inf)
    zero = run("i-timeprest", decay=0.0)
    huge = run("i-timeprest", decay=1e6)  # exp(-1e6 d) is exactly 0.0 for d >= 1
    assert inf[0] == latest[0] and torch.equal(inf[1], latest[1])
    assert huge[0] == latest[0] and torch.equal(huge[1], latest[1])
    assert zero[0] == stashed[0] and torch.equal(zero[1], stashed[1])
    mid = run("i-timeprest", decay=1.0)
    assert not torch.equal(mid[1], latest[1]) and not torch.equal(mid[1], stashed[1])
    inv = run("i-timeprest", significance="inverse", decay=math.inf)
    assert torch.equal(inv[1], latest[1])
    fn = run("i-timeprest", significance=lambda d: 0.0)
    assert torch.equal(fn[1], latest[1])


def test_intermediate_weight_is_the_sigma_mix():
    # one backward by hand: sigma * w_v + (1 - sigma) * w_k for a Linear stage
    from timeprest.policy.rules import Significance

    sig = Significance("exp", 0.7)
    assert sig(0) == 1.0
    assert sig(2) == pytest.approx(math.exp(-1.4))
    assert Significance("inverse", 0.5)(2) == pytest.approx(0.5)
    stages = tanh_mlp_stages(3)
    pipe = make_pipe(stages, "i-timeprest", 2, decay=0.7, distance_every=1)
    pipe.train(regression_batches(num=6))
    rep = pipe.report
    d0 = [d for m in rep.minibatches for d in m.stages[0].staleness]
    assert max(d0) >= 1  # stage 0 saw stale backwards
    assert all(m.stages[2].staleness == [0, 0] for m in rep.minibatches)
    # relative distance is positive only where the backward weights differ from the latest
    assert any(m.stages[0].relative_distance > 0 for m in rep.minibatches)
    assert all(m.stages[2].relative_distance == 0 for m in rep.minibatches)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("w", [2, 3, 4])
def test_weight_version_counts_match_section_6(method, w):
    n = METHODS[method].default_microbatches or w
    batches = regression_batches(num=3 * w + 3, rows=8)
    pipe = make_pipe(tanh_mlp_stages(w), method, n)
    pipe.train(batches)
    measured = [r.peak_versions for r in pipe.report.stages]
    kind, policy = resolve_policy(method)
    plans = plan_versions(pipe.schedule_for(len(batches)), policy)
    assert measured == [p.peak_versions for p in plans]
    weights = [r.weight_bytes for r in pipe.report.stages]
    if method in ("gpipe", "1f1b", "v-timeprest"):
        assert measured == [1] * w
    elif method == "pipedream":
        assert measured == [w - s for s in range(w)]
    elif method == "pipedream-2bw":
        assert measured == [2] * w
    elif method == "timeprest":
        assert measured[0] == 1 and all(m > 1 for m in measured[1:])
    elif method == "i-timeprest":
        assert measured == [w - s for s in range(w)]
        # plus one transient intermediate weight where backwards are stale
        peaks = [r.peak_weight_bytes for r in pipe.report.stages]
        for s in range(w - 1):
            assert peaks[s] == (w - s + 1) * weights[s]
        assert peaks[w - 1] == weights[w - 1]
    if method != "i-timeprest" and not any(x for p in plans for x in p.transient):
        assert [r.peak_weight_bytes for r in pipe.report.stages] == [
            m * b for m, b in zip(measured, weights)
        ]
    # every method: the stored versions plus the plan's transient weight, at their highest
    assert [r.peak_weight_bytes for r in pipe.report.stages] == [
        p.peak_with_transient * b for p, b in zip(plans, weights)
    ]


@pytest.mark.parametrize(
    "method,n",
    [("gpipe", 3), ("1f1b", 2), ("pipedream", 1), ("pipedream", 3), ("pipedream-2bw", 3)],
)
def test_recompute_equals_graph_when_backward_reads_the_forward_weights(method, n):
    # gpipe/1f1b: backward version = forward version; pipedream(-2bw): stashed
    batches = regression_batches(num=6)
    a, b = tanh_mlp_stages(3), tanh_mlp_stages(3)
    la = make_pipe(a, method, n).train(batches)
    lb = make_pipe(b, method, n, grad_rule="recompute").train(batches)
    assert la == pytest.approx(lb, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-12, atol=1e-12)


def test_recompute_differs_from_graph_for_latest_weights():
    # with stale backwards the two rules are different algorithms
    batches = regression_batches(num=6)
    a, b = tanh_mlp_stages(3), tanh_mlp_stages(3)
    make_pipe(a, "v-timeprest", 2).train(batches)
    make_pipe(b, "v-timeprest", 2, grad_rule="recompute").train(batches)
    assert not torch.allclose(flat(a), flat(b), rtol=1e-9, atol=1e-12)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.tanh(self.lin(x)))


def test_recompute_replays_dropout_masks():
    batches = regression_batches(num=5)

    def run(rule):
        torch.manual_seed(3)
        stages = [Noisy(), nn.Linear(8, 2, dtype=torch.float64)]
        losses = make_pipe(stages, "gpipe", 2, grad_rule=rule, seed=5).train(batches)
        return losses, flat(stages)

    g, r = run("graph"), run("recompute")
    assert g[0] == pytest.approx(r[0], rel=1e-12)
    torch.testing.assert_close(g[1], r[1], rtol=1e-12, atol=1e-12)
    # and the seed matters: another seed draws other masks
    torch.manual_seed(3)
    stages = [Noisy(), nn.Linear(8, 2, dtype=torch.float64)]
    other = make_pipe(stages, "gpipe", 2, seed=6).train(batches)
    assert other != g[0]


def test_batchnorm_buffers_are_not_versioned_and_not_double_counted():
    torch.manual_seed(0)

    def stages():
        torch.manual_seed(0)
        return [
            nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh()).double(),
            nn.Linear(8, 2).double(),
        ]

    batches = regression_batches(num=4, rows=12)
    a, b = stages(), stages()
    make_pipe(a, "gpipe", 2).train(batches)
    make_pipe(b, "gpipe", 2, grad_rule="recompute").train(batches)
    bn_a, bn_b = a[0][1], b[0][1]
    assert int(bn_a.num_batches_tracked) == 8  # 4 mini-batches x 2 micro-batches
    assert int(bn_b.num_batches_tracked) == 8
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean)
    # with lr = 0 the statistics must be exactly those of running the micro-batches in order
    c = stages()
    make_pipe(c, "pipedream", 2, lr=0.0).train(batches)
    ref = stages()
    model = nn.Sequential(*ref)
    for x, _ in batches:
        for xj in torch.tensor_split(x, 2):
            model(xj)
    torch.testing.assert_close(c[0][1].running_mean, ref[0][1].running_mean)
    torch.testing.assert_close(c[0][1].running_var, ref[0][1].running_var)


def test_report_records_versions_and_losses():
    batches = regression_batches(num=6)
    pipe = make_pipe(tanh_mlp_stages(3), "pipedream", 1)
    losses = pipe.train(batches)
    rep = pipe.report
    assert [m.loss for m in rep.minibatches] == losses
    assert [m.minibatch for m in rep.minibatches] == list(range(6))
    # PipeDream: stage 0 reads version t-2 for t >= 2 and is 2 versions stale at the backward
    assert [m.stages[0].forward_versions for m in rep.minibatches] == [[0], [0], [0], [1], [2], [3]]
    assert [m.stages[0].staleness for m in rep.minibatches] == [[0], [1], [2], [2], [2], [2]]
    assert all(r.updates == 6 for r in rep.stages)
    assert rep.stages[0].peak_activation_bytes > 0
    # a second call continues the version count and the mini-batch index
    pipe.train(batches[:2])
    assert [m.minibatch for m in rep.minibatches][-2:] == [6, 7]
    assert rep.minibatches[-1].stages[0].forward_versions == [6]
    assert pipe.version(0) == 8


def test_loss_is_the_row_weighted_mean_over_microbatches():
    # 10 rows in 3 micro-batches (4, 3, 3): the loss is the full-batch mean
    batches = regression_batches(num=1, rows=10)
    stages = tanh_mlp_stages(2)
    expect = torch.nn.functional.mse_loss(nn.Sequential(*stages)(batches[0][0]), batches[0][1])
    losses = make_pipe(stages, "gpipe", 3).train(batches)
    assert losses[0] == pytest.approx(expect.item(), rel=1e-12)


def test_float32_and_adam_run():
    stages = tanh_mlp_stages(3, dtype=torch.float32)
    pipe = timeprest.Pipeline(
        stages,
        method="i-timeprest",
        num_microbatches=2,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        loss_fn=torch.nn.functional.mse_loss,
    )
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 2, generator=g)
    batches = [(x, torch.tanh(x @ a)) for x, _ in regression_batches(num=30, dtype=torch.float32)]
    losses = pipe.train(batches)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    assert all(r.optimizer_state_bytes > 0 for r in pipe.report.stages)


def test_stage_without_parameters():
    stages = [
        nn.Sequential(nn.Linear(4, 8), nn.Tanh()).double(),
        nn.Tanh(),
        nn.Linear(8, 2).double(),
    ]
    pipe = make_pipe(stages, "v-timeprest", 2)
    losses = pipe.train(regression_batches(num=4))
    assert len(losses) == 4 and pipe.version(1) == 4


def _first_stage(kind: str) -> nn.Module:
    """A first stage with nothing to train: no parameters, or frozen ones."""
    if kind == "none":
        return nn.Tanh()
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double().requires_grad_(False)


@pytest.mark.parametrize("kind", ["none", "frozen"])
@pytest.mark.parametrize("method", ALL)
def test_first_stage_with_nothing_to_train(method, kind):
    """Its backward has nothing to compute (no weights, no input gradient to send): the
    run trains the other stages, and a flush method equals plain SGD (it used to stop on
    autograd's error for a backward without inputs, e.g. ``--model mlp`` with W = 4,
    whose first stage is the Flatten)."""
    batches = regression_batches(num=4)
    ref = [_first_stage(kind), *tanh_mlp_stages(2)]
    ref_losses = plain_sgd(ref, batches)
    stages = [_first_stage(kind), *tanh_mlp_stages(2)]
    frozen = [p.detach().clone() for p in stages[0].parameters()]
    pipe = make_pipe(stages, method, 3)
    losses = pipe.train(batches)
    assert len(losses) == 4 and pipe.version(1) == 4
    assert all(torch.equal(a, p) for a, p in zip(frozen, stages[0].parameters()))
    if method in ("gpipe", "1f1b"):
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        torch.testing.assert_close(flat(stages), flat(ref), rtol=1e-12, atol=1e-12)


def test_lr_lambda_scales_each_update():
    # a per-update schedule equals plain SGD with the same per-step learning rates
    batches = regression_batches(num=5)
    factors = [1.0, 0.5, 0.25, 2.0, 0.0]
    ref = tanh_mlp_stages(2)
    model = nn.Sequential(*ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for (x, y), f in zip(batches, factors):
        opt.param_groups[0]["lr"] = 0.1 * f
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    stages = tanh_mlp_stages(2)
    make_pipe(stages, "1f1b", 2, lr_lambda=lambda t: factors[t]).train(batches)
    torch.testing.assert_close(flat(stages), flat(ref), rtol=1e-12, atol=1e-12)


class _TiedStage(nn.Module):
    """One Linear used twice and a second Linear holding the first one's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one Parameter under two names
        self.twice = nn.Sequential(self.a, nn.Tanh(), self.a)  # one module at two places

    def forward(self, x):
        return torch.tanh(self.b(self.twice(x)))


def tied_stages(w):
    torch.manual_seed(3)
    stages = [_TiedStage().double(), nn.Linear(4, 2).double()]
    return stages if w == 2 else [nn.Sequential(*stages)]


@pytest.mark.parametrize(
    "method,w", [("gpipe", 2), ("1f1b", 2), ("pipedream", 1), ("i-timeprest", 1)]
)
def test_tied_weights_inside_a_stage_equal_plain_sgd(method, w):
    """Every place a tied parameter is read gets the forward version (no live parameter
    left in the graph): the methods that equal plain SGD still do, and the module holds
    its own Parameters again afterwards."""
    batches = regression_batches(num=4, rows=6)
    ref = tied_stages(w)
    ref_losses = plain_sgd(ref, batches)
    stages = tied_stages(w)
    losses = make_pipe(stages, method, 2 if w == 2 else 1).train(batches)
    assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(flat(stages), flat(ref), rtol=1e-12, atol=1e-12)
    tied = stages[0] if w == 2 else stages[0][0]
    assert isinstance(tied.a.weight, nn.Parameter) and tied.b.weight is tied.a.weight
    assert tied.twice[0] is tied.a


def test_parameters_are_restored_when_a_forward_fails():
    stages = tanh_mlp_stages(2)
    pipe = make_pipe(stages, "v-timeprest", 2)
    before = [id(p) for m in stages for p in m.parameters()]
    bad = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    with pytest.raises(timeprest.errors.ShapeError):
        pipe.train(bad)
    after = list(stages[0].parameters()) + list(stages[1].parameters())
    assert [id(p) for p in after] == before
    assert all(isinstance(p, nn.Parameter) for p in after)


def test_receive_waits_are_counted_while_actions_are_timed(monkeypatch):
    """recv_seconds adds up the time spent in the transport's receives, only while
    action_times is set: stage 1 receives 3 x 2 activations, stage 0 as many gradients."""
    from timeprest.engine.mailbox import CheckingMailbox

    def slow(recv):
        def wrapped(self, op):
            time.sleep(0.005)
            return recv(self, op)

        return wrapped

    monkeypatch.setattr(CheckingMailbox, "recv", slow(CheckingMailbox.recv))
    pipe = make_pipe(tanh_mlp_stages(2), "v-timeprest", 2)
    pipe.train(regression_batches(num=3))
    assert [r.recv_seconds for r in pipe.runners] == [0.0, 0.0]
    for r in pipe.runners:
        r.action_times = []
    pipe.train(regression_batches(num=3))
    for r in pipe.runners:
        assert 6 * 0.005 <= r.recv_seconds
        assert r.recv_seconds <= sum(sec for _, _, _, sec, _ in r.action_times)
        # the mailbox never waits for a message: the sleeps were the receives' own work
        assert r.wait_seconds == 0.0 and all(w == 0.0 for *_, w in r.action_times)


def test_relative_distance_is_sampled_every_k_minibatches():
    """distance_every=K measures the figure at global mini-batches t % K == 0 (the same
    values as measuring all), None at the others (zero or not, so that the mean of the
    measured ones is not biased toward the cheap zeros); training is unchanged."""
    runs = {}
    for every in (1, 3):
        stages = tanh_mlp_stages(3)
        pipe = make_pipe(stages, "pipedream", 1, distance_every=every)
        pipe.train(regression_batches(num=8))
        pipe.train(regression_batches(num=4))  # the second call's t continue the count
        runs[every] = pipe
    exact, sampled = (runs[e].report.minibatches for e in (1, 3))
    assert [m.loss for m in exact] == [m.loss for m in sampled]
    for a, b in zip(exact, sampled):
        d_exact, d_sampled = a.stages[0].relative_distance, b.stages[0].relative_distance
        if b.minibatch % 3 == 0:
            assert d_sampled == d_exact
        else:
            assert d_sampled is None
    assert any(m.stages[0].relative_distance for m in sampled)
    # the mean over the measured mini-batches only
    measured = [a.stages[0].relative_distance for a in exact if a.minibatch % 3 == 0]
    assert runs[3].report.mean_relative_distance(0) == pytest.approx(sum(measured) / len(measured))
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="distance_every"):
            make_pipe(tanh_mlp_stages(3), "pipedream", 1, distance_every=bad)
