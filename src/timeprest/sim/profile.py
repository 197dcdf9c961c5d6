"""Measure a cost model on this machine: per-stage times and memory of one micro-batch.

Each stage is timed on a deep copy (the caller's modules keep their weights,
gradients and BatchNorm statistics), fed with the previous stage's output,
``warmup`` times untimed and then ``repeats`` times. The layers alone keep
the median; the engine's times are the median over mini-batches of each
mini-batch's mean (see :func:`profile_stages`).
Sizes are measured the way the emulator measures them: the saved-activation
bytes are the unique storages autograd saves during the forward, weight
tensors and buffers excluded (and, at the last stage, the loss included).
The input micro-batch is copied out of the mini-batch first, so it is
counted at its own size, not as the whole mini-batch it is a view of.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from timeprest.device import sync_device
from timeprest.errors import ConfigError, MultipleSequenceWarning, ShapeError
from timeprest.policy.methods import DEFAULT_METHOD
from timeprest.sim.costmodel import CostModel, StageCost
from timeprest.stage.timing import action_costs
from timeprest.versions import optimizer_state_bytes

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def saved_bytes_hooks(
    module: nn.Module,
) -> tuple[Callable[[Tensor], Any], Callable[[Any], Tensor], list[int]]:
    """saved_tensors_hooks that add up the unique storages saved, parameters and buffers excluded.

    Returns ``(pack, unpack, total)``; ``total[0]`` holds the bytes counted.
    """
    skip = {
        t.untyped_storage().data_ptr()
        for t in [*module.parameters(), *module.buffers()]
        if t.numel() > 0
    }
    seen: set[int] = set()
    total = [0]

    def pack(t: Tensor) -> Tensor:
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip and ptr not in seen:
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
        # detached: a saved output kept as itself would hold its own grad_fn, a cycle
        # through autograd's C++ side that no collection frees when the graph is never
        # backpropagated (this forward's is not); autograd re-attaches it when unpacking
        return t.detach()

    def unpack(t: Tensor) -> Tensor:
        return t

    return pack, unpack, total


def _median_time(fn: Callable[[], object], dev: torch.device, warmup: int, repeats: int) -> float:
    times: list[float] = []
    for _ in range(warmup + repeats):
        sync_device(dev)
        t0 = time.perf_counter()
        fn()
        sync_device(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def profile_stages(
    stages: Sequence[nn.Module],
    sample_input: Tensor,
    num_microbatches: int,
    *,
    sample_target: Tensor | None = None,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerFactory | None = None,
    device: str | torch.device = "cpu",
    warmup: int | None = None,
    repeats: int = 5,
    bandwidth: float | None = None,
    latency: float = 0.0,
    meta: Mapping[str, Any] | None = None,
    method: str | None = DEFAULT_METHOD,
) -> CostModel:
    """Time and size every stage on one micro-batch of ``sample_input`` (a mini-batch).

    Times come from the engine itself: the emulator trains copies of the
    stages with ``method`` on ``warmup + repeats`` mini-batches (all equal to
    ``sample_input``), timing every action through the same stage code the
    engines run (versioned weights, saved-tensor hooks, stashing, the
    update); each action's mean time per timed mini-batch, and the median of
    those over the last ``repeats`` mini-batches, are kept (a cost every
    mini-batch pays counts, a one-off stall does not; a ``B`` action over
    several micro-batches counts per micro-batch). ``warmup`` (default: the
    number of stages, at least 2) covers the pipeline's fill, whose first
    actions are slower.
    ``method=None`` times the layers alone instead: a plain autograd forward
    and backward per stage, and an optimizer step with made-up gradients.

    The last stage's forward includes ``loss_fn(output, target)`` on the
    matching micro-batch of ``sample_target`` (without them, the loss is the
    output's sum: the backward starts from a gradient of ones). ``optimizer``
    (default ``SGD(lr=0.01, momentum=0.9)``) is timed and its state sized.
    ``bandwidth`` (bytes/s, ``None``: infinite) and ``latency`` (s) describe
    the link and are stored in the cost model as given.
    """
    if not stages:
        raise ConfigError("profile_stages needs at least one stage")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ConfigError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if sample_input.dim() == 0 or sample_input.shape[0] < num_microbatches:
        raise ConfigError(
            f"the sample mini-batch has {sample_input.shape[0] if sample_input.dim() else 0} rows, "
            f"fewer than the {num_microbatches} micro-batches: raise the batch size"
        )
    if warmup is None:  # the pipeline's fill (docs/simulator.md)
        warmup = max(2, len(stages))
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"profiling needs warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    if (sample_target is None) != (loss_fn is None):
        raise ConfigError("give both sample_target and loss_fn, or neither")
    dev = torch.device(device)
    make_opt: OptimizerFactory = optimizer or (
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)
    )
    x = torch.tensor_split(sample_input, num_microbatches)[0].detach().to(dev).clone()
    target = None
    if sample_target is not None:
        target = torch.tensor_split(sample_target, num_microbatches)[0].detach().to(dev).clone()
    input_bytes = _nbytes(x)
    last = len(stages) - 1
    results: list[StageCost] = []
    plain: list[tuple[float, float, float]] = []
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        for s, stage in enumerate(stages):
            probe = copy.deepcopy(stage).to(dev).train()
            params = [p for p in probe.parameters() if p.requires_grad]
            with_loss = s == last and loss_fn is not None

            def forward(
                inp: Tensor, probe: nn.Module = probe, with_loss: bool = with_loss, s: int = s
            ) -> Tensor:
                out = probe(inp)
                if not isinstance(out, Tensor):
                    raise ShapeError(
                        f"stage {s} returned {type(out).__name__}; each stage must return one tensor"
                    )
                if with_loss:
                    assert loss_fn is not None and target is not None
                    out = loss_fn(out, target)
                return out

            def fresh_input(x: Tensor = x, s: int = s) -> Tensor:
                inp = x.detach()
                if s > 0 and inp.is_floating_point():
                    inp.requires_grad_(True)  # later stages send a gradient back
                return inp

            # sizes: one untimed forward under the counting hooks
            pack, unpack, total = saved_bytes_hooks(probe)
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                    out = forward(fresh_input())
            except (RuntimeError, TypeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ShapeError(
                    f"stage {s} cannot consume its input (shape {tuple(x.shape)}): {first}"
                ) from exc
            saved = total[0]
            output = out.detach()
            del out

            sized = StageCost(
                forward_time=1.0,  # placeholders until timed
                backward_time=1.0,
                output_bytes=0 if s == last else _nbytes(output),
                weight_bytes=sum(_nbytes(p) for p in params),
                optimizer_state_bytes=_optimizer_state_bytes(make_opt, params, dev),
                saved_activation_bytes=saved,
            )
            if method is None:  # the layers alone; else timed below, through the engine
                plain.append(
                    _plain_times(
                        forward, fresh_input, params, with_loss, make_opt, dev, warmup, repeats
                    )
                )
            results.append(sized)
            x = output
            del probe
    times = plain
    if method is not None:
        times = _engine_times(
            stages,
            sample_input,
            sample_target,
            num_microbatches,
            loss_fn,
            make_opt,
            dev,
            method,
            warmup,
            repeats,
        )
    results = [
        replace(c, forward_time=f, backward_time=b, update_time=u)
        for c, (f, b, u) in zip(results, times)
    ]
    info: dict[str, Any] = {
        "timed": "layers alone" if method is None else f"engine, method {method}",
        "device": str(dev),
        "torch": torch.__version__,
        "num_microbatches": num_microbatches,
        "microbatch_rows": int(torch.tensor_split(sample_input, num_microbatches)[0].shape[0]),
        "warmup": warmup,
        "repeats": repeats,
    }
    info.update(meta or {})
    return CostModel(
        stages=tuple(results),
        input_bytes=input_bytes,
        bandwidth=bandwidth,
        latency=latency,
        meta=info,
    )


def _optimizer_state_bytes(
    make_opt: OptimizerFactory, params: list[nn.Parameter], dev: torch.device
) -> int:
    """Bytes of the optimizer's state after one step (made-up gradients, on copies)."""
    if not params:
        return 0
    copies = [nn.Parameter(p.detach().clone().to(dev)) for p in params]
    opt = make_opt(copies)
    for p in copies:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return optimizer_state_bytes(opt)


def _engine_times(
    stages: Sequence[nn.Module],
    sample_input: Tensor,
    sample_target: Tensor | None,
    num_microbatches: int,
    loss_fn: LossFn | None,
    make_opt: OptimizerFactory,
    dev: torch.device,
    method: str,
    warmup: int,
    repeats: int,
) -> list[tuple[float, float, float]]:
    """Per stage (forward, backward per micro-batch, update) seconds, timed in the emulator."""
    from timeprest.pipeline import Pipeline

    copies = [copy.deepcopy(m).to(dev).train() for m in stages]
    x = sample_input.detach().to(dev)
    if sample_target is None or loss_fn is None:
        target = x

        def total(out: Tensor, _target: Tensor) -> Tensor:
            return out.sum()

        loss: LossFn = total
    else:
        target, loss = sample_target.detach().to(dev), loss_fn
    with warnings.catch_warnings():  # a short N is fine for timing
        warnings.simplefilter("ignore", MultipleSequenceWarning)
        pipe = Pipeline(
            copies,
            method=method,
            num_microbatches=num_microbatches,
            optimizer=make_opt,
            loss_fn=loss,
        )
    for r in pipe.runners:
        r.action_times = []
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        pipe.train([(x, target)] * (warmup + repeats))
    out: list[tuple[float, float, float]] = []
    for r in pipe.runners:
        assert r.action_times is not None
        out.append(action_costs(r.action_times, skip=warmup))
        r.action_times = None
    return out


def _plain_times(
    forward: Callable[[Tensor], Tensor],
    fresh_input: Callable[[], Tensor],
    params: list[nn.Parameter],
    with_loss: bool,
    make_opt: OptimizerFactory,
    dev: torch.device,
    warmup: int,
    repeats: int,
) -> tuple[float, float, float]:
    """Median seconds of a plain autograd forward and backward, and of an optimizer step."""
    fwd_times: list[float] = []
    bwd_times: list[float] = []
    for i in range(warmup + repeats):
        inp = fresh_input()
        sync_device(dev)
        t0 = time.perf_counter()
        out = forward(inp)
        sync_device(dev)
        t1 = time.perf_counter()
        if out.requires_grad:
            out.backward(None if with_loss else torch.ones_like(out))
        sync_device(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd_times.append(t1 - t0)
            bwd_times.append(t2 - t1)
        for p in params:
            p.grad = None
    # an optimizer step with made-up gradients (its time does not depend on values)
    update_time = 0.0
    if params:
        opt = make_opt(params)

        def step() -> None:
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            opt.step()

        update_time = _median_time(step, dev, warmup, repeats)
    return (
        max(statistics.median(fwd_times), 1e-9),
        max(statistics.median(bwd_times), 1e-9),
        update_time,
    )
