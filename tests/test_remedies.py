"""The staleness remedies of docs/design.md section 12 against hand-written references.

The reference is plain loops and explicit formulas for Linear+Tanh stages; the
only thing it takes from the library is the per-stage program text, from
which the versions (and so every micro-batch's d) are counted.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import timeprest
from helpers import (
    SMALL_RUN,
    assert_one_line_error,
    flat,
    regression_batches,
    run_cli,
    tanh_mlp_stages,
)
from test_pipeline import program_versions
from timeprest.errors import ConfigError, MultipleSequenceWarning
from timeprest.policy import METHODS, plan_versions, resolve_policy
from timeprest.policy.remedies import Correction, LrRule, Velocity
from timeprest.sim import CostModel, simulate_schedule

NEW = [
    "weight-prediction",
    "pipemare",
    "pipedream-lr",
    "dc-asgd",
    "gap-aware",
    "i-timeprest-velocity",
]
LR = 0.2


def optimizer_factory(kind: str, lr: float = LR):
    if kind == "sgd":
        return lambda p: torch.optim.SGD(p, lr=lr)
    if kind == "momentum":
        return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)
    if kind == "adam":
        return lambda p: torch.optim.Adam(p, lr=lr * 0.1)
    return lambda p: torch.optim.AdamW(p, lr=lr * 0.1, weight_decay=0.1)


def make_pipe(stages, method, n, opt="sgd", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        return timeprest.Pipeline(
            stages,
            method=method,
            num_microbatches=n,
            optimizer=optimizer_factory(opt),
            loss_fn=nn.functional.mse_loss,
            **kw,
        )


# -- the reference ----------------------------------------------------------------------


class RefOptimizer:
    """SGD (with or without momentum), Adam and AdamW by their textbook formulas.

    ``direction()`` is the step direction u after the updates made so far
    (None before the first).
    """

    def __init__(self, kind: str, lr: float) -> None:
        self.kind, self.lr = kind, lr if kind in ("sgd", "momentum") else lr * 0.1
        self.state: list[dict[str, torch.Tensor]] | None = None
        self.last: list[torch.Tensor] | None = None
        self.t = 0

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float):
        self.t += 1
        if self.kind == "sgd":
            self.last = grads
            return [p - lr * g for p, g in zip(params, grads)]
        if self.kind == "momentum":
            if self.state is None:
                self.state = [{"b": g.clone()} for g in grads]
            else:
                for st, g in zip(self.state, grads):
                    st["b"] = 0.9 * st["b"] + g
            return [p - lr * st["b"] for p, st in zip(params, self.state)]
        if self.state is None:
            self.state = [{"m": torch.zeros_like(g), "v": torch.zeros_like(g)} for g in grads]
        out = []
        for p, g, st in zip(params, grads, self.state):
            if self.kind == "adamw":
                p = p * (1 - lr * 0.1)
            st["m"] = 0.9 * st["m"] + 0.1 * g
            st["v"] = 0.999 * st["v"] + 0.001 * g * g
            out.append(p - lr * self._adam_u(st))
        return out

    def _adam_u(self, st):
        m_hat = st["m"] / (1 - 0.9**self.t)
        v_hat = st["v"] / (1 - 0.999**self.t)
        return m_hat / (v_hat.sqrt() + 1e-8)

    def direction(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if self.t == 0:
            return None
        if self.kind == "sgd":
            return self.last
        if self.kind == "momentum":
            return [st["b"] for st in self.state]
        us = [self._adam_u(st) for st in self.state]
        if self.kind == "adamw":
            us = [u + 0.1 * p for u, p in zip(us, params)]
        return us


def remedy_reference(
    stages,
    batches,
    programs,
    n,
    *,
    forward="live",
    backward="latest",
    correction="none",
    opt="sgd",
    gamma=0.9,
    sigma=None,
    dc_lambda=0.04,
    gap_beta=0.999,
    gap_eps=1e-8,
    warmup=None,
    lr_factor=None,
):
    """Explicit formulas of docs/design.md section 12, d of every micro-batch from the programs.

    ``lr_factor(t)`` scales the learning rate of mini-batch t (the pipeline's ``lr_lambda``).
    """
    w = len(stages)
    lins = [m if isinstance(m, nn.Linear) else m[0] for m in stages]
    hist = [[[lin.weight.detach().clone(), lin.bias.detach().clone()]] for lin in lins]
    zeros = [[torch.zeros_like(p) for p in hist[s][0]] for s in range(w)]
    delta = [[zeros[s]] for s in range(w)]  # delta after k updates
    sq = [[zeros[s]] for s in range(w)]  # running mean of the squared direction u, k updates
    lr_max = [0.0] * w  # the largest learning rate of a stage's updates so far
    dirs: list[list] = [[None] for _ in range(w)]  # step direction after k updates
    opts = [RefOptimizer(opt, LR) for _ in range(w)]
    fwd, bwd = program_versions(programs)
    losses = []
    for t, (x, y) in enumerate(batches):
        rows = x.shape[0]
        plain = [[torch.zeros_like(p) for p in hist[s][-1]] for s in range(w)]
        stale: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(w)]
        total = 0.0
        ds = [[] for _ in range(w)]
        for j, (xj, yj) in enumerate(zip(torch.tensor_split(x, n), torch.tensor_split(y, n))):
            acts, outs = [xj], []
            for s in range(w):
                v, k = fwd[s][(t, j)], bwd[s][t]
                d = k - v
                W_, b_ = hist[s][v]
                if forward == "predicted" and d > 0 and dirs[s][v] is not None:
                    lr_v = opts[s].lr  # constant learning rates in these tests
                    W_ = W_ - d * lr_v * dirs[s][v][0]
                    b_ = b_ - d * lr_v * dirs[s][v][1]
                z = acts[-1] @ W_.T + b_
                h = z if s == w - 1 else torch.tanh(z)
                outs.append(h)
                acts.append(h)
            frac = xj.shape[0] / rows
            diff = outs[-1] - yj
            total += frac * float((diff**2).mean())
            dl = 2.0 * diff / diff.numel() * frac
            for s in reversed(range(w)):
                if s < w - 1:
                    dl = dl * (1 - outs[s] ** 2)
                v, k = fwd[s][(t, j)], bwd[s][t]
                d = k - v
                ds[s].append(d)
                if backward == "stashed":
                    W_b = hist[s][v][0]
                elif backward == "latest":
                    W_b = hist[s][k][0]
                elif backward == "velocity":
                    W_b = hist[s][k][0] - d * delta[s][k][0]
                else:  # intermediate-velocity
                    c = sigma(d) * d if d > 0 else 0.0
                    W_b = hist[s][k][0] - c * delta[s][k][0]
                g = [dl.T @ acts[s], dl.sum(0)]
                if correction != "none" and v != k:
                    acc = stale[s].setdefault(v, [torch.zeros_like(q) for q in g])
                    for a, q in zip(acc, g):
                        a += q
                else:
                    for a, q in zip(plain[s], g):
                        a += q
                dl = dl @ W_b
        losses.append(total)
        for s in range(w):
            k = bwd[s][t]
            grads = plain[s]
            for v in sorted(stale[s]):
                for i, g in enumerate(stale[s][v]):
                    gap = hist[s][k][i] - hist[s][v][i]
                    if correction == "dc":
                        fixed = g + dc_lambda * g * g * gap
                    else:
                        bias = 1 - gap_beta**k
                        c_typ = lr_max[s] * ((sq[s][k][i] / bias).sqrt() + gap_eps)
                        fixed = g / (1 + gap.abs() / c_typ)
                    grads[i] = grads[i] + fixed
            lr = opts[s].lr
            if lr_factor is not None:
                lr = lr * lr_factor(t)
            if warmup is not None:
                tau = max(1.0, sum(ds[s]) / len(ds[s]))
                lr = lr / tau ** (1 - min(t / warmup, 1.0))
            old = hist[s][-1]
            new = opts[s].step(old, grads, lr)
            hist[s].append(new)
            delta[s].append(
                [gamma * a + (1 - gamma) * (nw - ow) for a, nw, ow in zip(delta[s][-1], new, old)]
            )
            dirs[s].append(opts[s].direction(new))
            sq[s].append(
                [gap_beta * a + (1 - gap_beta) * u**2 for a, u in zip(sq[s][-1], dirs[s][-1])]
            )
            lr_max[s] = max(lr_max[s], lr)
    final = torch.cat([torch.cat([hist[s][-1][0].reshape(-1), hist[s][-1][1]]) for s in range(w)])
    return losses, final


def check_against_reference(method, n, opt="sgd", pipe_kw=None, **ref_kw):
    batches = regression_batches(num=8, rows=9)
    stages = tanh_mlp_stages(3)
    pipe = make_pipe(stages, method, n, opt, **(pipe_kw or {}))
    programs = pipe.schedule_for(len(batches)).programs
    ref_losses, ref_final = remedy_reference(
        tanh_mlp_stages(3), batches, programs, n, opt=opt, **ref_kw
    )
    losses = pipe.train(batches)
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-10)
    torch.testing.assert_close(flat(stages), ref_final, rtol=1e-10, atol=1e-10)
    return pipe


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("n", [1, 3])
def test_weight_prediction_matches_reference(opt, n):
    check_against_reference("weight-prediction", n, opt, forward="predicted", backward="latest")


@pytest.mark.parametrize("n", [1, 3])
def test_predicted_forward_with_stashed_backward_matches_reference(n):
    check_against_reference(
        "pipedream",
        n,
        "momentum",
        {"forward": "predicted"},
        forward="predicted",
        backward="stashed",
    )


@pytest.mark.parametrize("n", [1, 3])
def test_pipemare_matches_reference(n):
    check_against_reference(
        "pipemare", n, "momentum", {"pipemare_warmup": 4}, backward="velocity", warmup=4
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_velocity_backward_matches_reference(gamma):
    check_against_reference(
        "v-timeprest",
        3,
        "sgd",
        {"backward": "velocity", "gamma": gamma},
        backward="velocity",
        gamma=gamma,
    )


@pytest.mark.parametrize("n", [2, 3])
def test_i_timeprest_velocity_matches_reference(n):
    check_against_reference(
        "i-timeprest-velocity",
        n,
        "sgd",
        {"decay": 0.7},
        backward="intermediate-velocity",
        sigma=lambda d: math.exp(-0.7 * d),
    )


def test_pipedream_lr_matches_reference():
    check_against_reference(
        "pipedream-lr", 1, "sgd", {"pipemare_warmup": 5}, backward="stashed", warmup=5
    )


@pytest.mark.parametrize("n", [1, 3])
def test_dc_asgd_matches_reference(n):
    check_against_reference(
        "dc-asgd",
        n,
        "sgd",
        {"dc_lambda": 2.0},
        backward="stashed",
        correction="dc",
        dc_lambda=2.0,
    )


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "adamw"])
def test_gap_aware_matches_reference(n, opt):
    check_against_reference(
        "gap-aware",
        n,
        opt,
        {"gap_beta": 0.9},
        backward="stashed",
        correction="gap-aware",
        gap_beta=0.9,
    )


def test_gap_aware_scales_by_the_largest_learning_rate_so_far():
    # a falling rate: C keeps the first (largest) one, not the current one
    def factor(t: int) -> float:
        return 1.0 / (1 + t)

    check_against_reference(
        "gap-aware",
        3,
        "momentum",
        {"gap_beta": 0.9, "lr_lambda": factor},
        backward="stashed",
        correction="gap-aware",
        gap_beta=0.9,
        lr_factor=factor,
    )


def test_correction_on_a_latest_backward_matches_reference():
    check_against_reference(
        "v-timeprest",
        2,
        "sgd",
        {"correction": "dc", "dc_lambda": 1.0},
        backward="latest",
        correction="dc",
        dc_lambda=1.0,
    )


# -- limits ----------------------------------------------------------------------------


def run(method, n=2, opt="momentum", w=3, num=8, **kw):
    stages = tanh_mlp_stages(w)
    losses = make_pipe(stages, method, n, opt, **kw).train(regression_batches(num=num, rows=9))
    return losses, flat(stages)


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-12, abs=1e-12)
    torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_every_new_preset_is_plain_training_with_one_stage(method, opt):
    # W = 1: no staleness anywhere; the optimizer's own step is all that happens
    batches = regression_batches(num=6, rows=9)
    ref = tanh_mlp_stages(1)
    model = nn.Sequential(*ref)
    o = optimizer_factory(opt)(list(model.parameters()))
    ref_losses = []
    for x, y in batches:
        o.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        o.step()
        ref_losses.append(loss.item())
    stages = tanh_mlp_stages(1)
    losses = make_pipe(stages, method, 2, opt).train(batches)
    assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(flat(stages), flat(ref), rtol=1e-12, atol=1e-12)


def test_predicted_reads_the_live_weights_exactly_where_d_is_zero():
    stages = tanh_mlp_stages(3)
    pipe = make_pipe(stages, "weight-prediction", 3, "momentum")
    seen: list[tuple[int, int, bool]] = []
    for r in pipe.runners:
        original = r.remedies.predicted

        def spy(weights, d, r=r, original=original):
            out, extra = original(weights, d)
            same = all(a is b for a, b in zip(out, weights))
            seen.append((r.index, d, same))
            return out, extra

        r.remedies.predicted = spy
    pipe.train(regression_batches(num=8, rows=9))
    last = [(d, same) for s, d, same in seen if s == 2]
    assert last and all(d == 0 and same for d, same in last)
    first = [(d, same) for s, d, same in seen if s == 0]
    assert any(d > 0 for d, _ in first)
    assert all(same for d, same in first if d == 0)
    assert any(d > 0 and not same for d, same in first)
    # and the run differs from v-timeprest (same backward, live forward)
    assert not torch.allclose(flat(stages), run("v-timeprest", 3)[1])


def test_dc_with_lambda_zero_and_gap_aware_with_infinite_c_equal_stashed():
    base = run("pipedream", 1)
    assert_same(run("dc-asgd", 1, dc_lambda=0.0), base)
    assert_same(run("gap-aware", 1, gap_eps=math.inf), base)
    assert not torch.allclose(run("dc-asgd", 1, dc_lambda=5.0)[1], base[1])
    assert not torch.allclose(run("gap-aware", 1)[1], base[1])


def test_velocity_limits_equal_latest():
    latest = run("v-timeprest", 3)
    assert_same(run("v-timeprest", 3, backward="velocity", gamma=1.0), latest)
    assert_same(run("i-timeprest-velocity", 3, decay=math.inf), latest)
    # sigma = 1 (lambda = 0): the full velocity extrapolation
    assert_same(
        run("i-timeprest-velocity", 3, decay=0.0), run("v-timeprest", 3, backward="velocity")
    )
    assert not torch.allclose(run("pipemare", 3)[1], latest[1])


def test_pipemare_lr_after_warmup_is_the_optimizers():
    # K = 1: p(t) = 0 from the first update on, so only the velocity remains
    assert_same(
        run("pipemare", 3, pipemare_warmup=1),
        run("v-timeprest", 3, backward="velocity"),
    )


# -- memory: measured == plan == simulator -----------------------------------------------


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("w", [2, 3, 4])
def test_measured_versions_and_buffers_equal_the_simulator(method, w):
    n = METHODS[method].default_microbatches or w
    batches = regression_batches(num=3 * w + 3, rows=8)
    pipe = make_pipe(tanh_mlp_stages(w), method, n, "momentum")
    pipe.train(batches)
    sched = pipe.schedule_for(len(batches))
    _, policy = resolve_policy(method)
    sim = simulate_schedule(sched, policy, CostModel.uniform(w), method=method)
    plans = plan_versions(sched, policy)
    for r, st, plan in zip(pipe.report.stages, sim.stages, plans):
        assert r.peak_versions == st.weight_versions == plan.peak_versions
        assert r.extra_buffers == st.extra_buffers == plan.extra_buffers
        assert r.peak_weight_bytes == plan.peak_with_transient * r.weight_bytes
        assert r.extra_buffer_bytes == plan.extra_buffers * r.weight_bytes


@pytest.mark.parametrize("w", [2, 3, 4, 5, 6])
def test_i_timeprest_velocity_holds_one_version_and_one_buffer(w):
    pipe = make_pipe(tanh_mlp_stages(w), "i-timeprest-velocity", w, "sgd")
    pipe.train(regression_batches(num=2 * w + 2, rows=8))
    assert [r.peak_versions for r in pipe.report.stages] == [1] * w
    assert [r.extra_buffers for r in pipe.report.stages] == [1] * w
    sched = pipe.schedule_for(2 * w + 2)
    sim = simulate_schedule(sched, pipe.policy, CostModel.uniform(w))
    assert [s.weight_versions for s in sim.stages] == [1] * w
    assert [s.extra_buffers for s in sim.stages] == [1] * w


def test_extra_buffers_per_policy_part():
    _, p = resolve_policy("pipedream")
    assert p.extra_buffers == 0
    assert resolve_policy("weight-prediction")[1].extra_buffers == 0
    assert resolve_policy("pipemare")[1].extra_buffers == 1
    assert resolve_policy("gap-aware")[1].extra_buffers == 1
    assert resolve_policy("dc-asgd")[1].extra_buffers == 0
    assert resolve_policy("pipemare", correction="gap-aware")[1].extra_buffers == 2


# -- checkpoints, errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,opt",
    [("pipemare", "momentum"), ("gap-aware", "sgd"), ("weight-prediction", "sgd")],
)
def test_resume_carries_the_remedy_state(method, opt, tmp_path: Path):
    batches = regression_batches(num=10, rows=9)
    n = METHODS[method].default_microbatches or 3
    a = tanh_mlp_stages(3)
    pa = make_pipe(a, method, n, opt)
    pa.train(batches[:5])
    state = pa.runners[0].remedies.state_dict()
    held = [t for name in ("delta", "sq_steps", "last_grads") for t in state[name] or []]
    assert held and any(bool(t.abs().sum() > 0) for t in held)  # there is state to carry
    pa.save_checkpoint(tmp_path / "ck")
    la = pa.train(batches[5:])
    b = tanh_mlp_stages(3, seed=7)  # other weights: everything must come from the checkpoint
    pb = make_pipe(b, method, n, opt)
    pb.load_checkpoint(tmp_path / "ck")
    lb = pb.train(batches[5:])
    assert la == lb
    assert torch.equal(flat(a), flat(b))


def test_resume_carries_gap_awares_largest_rate(tmp_path: Path):
    pa = make_pipe(tanh_mlp_stages(3), "gap-aware", 3, "momentum", lr_lambda=lambda t: 1 / (1 + t))
    pa.train(regression_batches(num=4, rows=9))
    pa.save_checkpoint(tmp_path / "ck")
    pb = make_pipe(tanh_mlp_stages(3, seed=7), "gap-aware", 3, "momentum")
    pb.load_checkpoint(tmp_path / "ck")
    for ra, rb in zip(pa.runners, pb.runners):
        assert rb.remedies.max_lrs == ra.remedies.max_lrs == [LR] * 2  # the first, largest
    old = pa.runners[0].remedies.state_dict()
    del old["max_lrs"]  # a checkpoint from before C measured the optimizer's step
    with pytest.raises(ConfigError, match="no largest learning rate"):
        pb.runners[0].remedies.load_state_dict(old)


def test_prediction_names_the_supported_optimizers():
    with pytest.raises(ConfigError, match="supported optimizers are SGD, Adam, AdamW, got RMSprop"):
        timeprest.Pipeline(
            tanh_mlp_stages(2),
            method="weight-prediction",
            optimizer=lambda p: torch.optim.RMSprop(p, lr=0.1),
            loss_fn=nn.functional.mse_loss,
        )
    with pytest.raises(ConfigError, match="nesterov"):
        timeprest.Pipeline(
            tanh_mlp_stages(2),
            method="weight-prediction",
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
            loss_fn=nn.functional.mse_loss,
        )


def test_dc_with_replicas_is_refused_for_now():
    # gap-aware divides g by a factor that does not depend on g: it commutes with the
    # replicas' weighted sum (tests/test_replicas.py); dc's g * g does not
    with pytest.raises(ConfigError, match="dc gradient correction is not supported with data_par"):
        make_pipe(tanh_mlp_stages(2), "dc-asgd", 1, data_parallel=2)


def test_bad_remedy_settings_are_config_errors():
    with pytest.raises(ConfigError, match="gradient correction"):
        Correction("bogus")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gamma"):
        Velocity(1.5)
    with pytest.raises(ConfigError, match="warmup"):
        LrRule("pipemare", 0)
    with pytest.raises(ConfigError, match="learning-rate rule"):
        resolve_policy("pipedream", lr_rule="cosine")
    with pytest.raises(ConfigError, match="unknown Pipeline argument 'gama'"):
        make_pipe(tanh_mlp_stages(2), "pipemare", 2, gama=0.5)


def test_pipemare_factor():
    r = LrRule("pipemare", 10)
    assert r.factor(0, 4.0) == pytest.approx(0.25)
    assert r.factor(5, 4.0) == pytest.approx(0.5)
    assert r.factor(10, 4.0) == 1.0 == r.factor(50, 4.0)
    assert r.factor(0, 0.0) == 1.0  # tau is at least 1
    assert LrRule().factor(0, 4.0) == 1.0


def test_benchmark_script_runs_every_method_it_is_given(tmp_path: Path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "remedies.py"
    spec = importlib.util.spec_from_file_location("remedies_benchmark", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "--dataset", "synthetic:train=64,test=32", "--model", "mlp", "--stages", "2",
        "--epochs", "1", "--seeds", "0,1", "--batch-size", "16", "--jobs", "1",
        "--methods", "pipedream,gap-aware,i-timeprest-velocity", "--out", str(tmp_path),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    text = (tmp_path / "results.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "%" not in ln]
    assert [r.split("|")[1].strip() for r in rows] == [
        "pipedream",
        "gap-aware",
        "i-timeprest-velocity",
    ]
    # i-timeprest-velocity: one version per stage and one buffer
    assert rows[2].split("|")[4].strip() == "1 / 1" and rows[2].split("|")[5].strip() == "1"
    assert "0 of 2" in rows[0]


def test_train_flags_set_the_remedies(tmp_path: Path):
    run = tmp_path / "run"
    rc, _, err = run_cli(
        "train", *SMALL_RUN, "--epochs", "1", "--method", "gap-aware", "--gap-beta", "0.9",
        "--optimizer", "sgd", "--lr", "0.05", "--run-dir", str(run),
    )  # fmt: skip
    assert rc == 0, err
    import json

    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["gap_beta"], config["correction"]) == ("gap-aware", 0.9, None)
    rc, _, err = run_cli("train", *SMALL_RUN, "--method", "pipemare", "--correction", "bogus")
    assert_one_line_error(rc, err, "train", "unknown --correction 'bogus'")


def test_the_nesterov_method_is_pipedream_with_nadam():
    # the official code of Ajanthan et al.: weight stashing and NAdam at beta1 = 0.99
    from timeprest.train import TrainConfig
    from timeprest.train.optim import make_optimizer

    cfg = TrainConfig(method="pipedream", optimizer="nadam", momentum=0.99, lr=1e-3)
    opt = make_optimizer(cfg)(list(nn.Linear(2, 2).parameters()))
    assert isinstance(opt, torch.optim.NAdam)
    group = opt.param_groups[0]
    assert group["betas"] == (0.99, 0.999) and group["decoupled_weight_decay"]
    assert group["momentum_decay"] == 0.004
    losses = make_pipe(tanh_mlp_stages(3), "pipedream", 1, "sgd").train(regression_batches())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        pipe = timeprest.Pipeline(
            tanh_mlp_stages(3),
            method=cfg.method,
            optimizer=make_optimizer(cfg),
            loss_fn=nn.functional.mse_loss,
        )
    nadam = pipe.train(regression_batches())
    assert all(math.isfinite(v) for v in nadam) and nadam != losses


def test_bf16_casts_of_predicted_weights_are_swapped_for_the_backward_weights():
    from timeprest.stage.weights import Saved, weight_tokens

    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    w_fwd, w_bwd, offset = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    grad_out = torch.randn(3, 5)
    leaf = w_fwd.clone().requires_grad_()
    predicted = leaf + offset  # what a predicted forward reads
    saved = Saved(x, None, [leaf], 0, 0)
    with torch.autograd.graph.saved_tensors_hooks(
        *weight_tokens(saved, nn.Identity(), [predicted])
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = nn.functional.linear(x, predicted)
    assert saved.activation_bytes == x.numel() * 2  # the input's bf16 cast; no weight's
    saved.backward_weights = [w_bwd]
    dx, dw = torch.autograd.grad(out, [x, leaf], grad_outputs=grad_out.bfloat16())
    bf = torch.bfloat16
    assert torch.equal(dx, (grad_out.to(bf) @ w_bwd.to(bf)).float())
    assert torch.equal(dw, (grad_out.to(bf).T @ x.to(bf)).float())
