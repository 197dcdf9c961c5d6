"""Measure a cost model on this machine: per-stage times and memory of one micro-batch.

Each stage is timed on a deep copy (the caller's modules keep their weights,
gradients and BatchNorm statistics), fed with the previous stage's output,
``warmup`` times untimed and then ``repeats`` times; the median is kept.
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from timeprest.errors import ConfigError, ShapeError
from timeprest.sim.costmodel import CostModel, StageCost

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _sync(dev: torch.device) -> None:
    """Wait for queued device work so wall-clock times cover it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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
        return t

    def unpack(t: Tensor) -> Tensor:
        return t

    return pack, unpack, total


def _median_time(fn: Callable[[], object], dev: torch.device, warmup: int, repeats: int) -> float:
    times: list[float] = []
    for _ in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
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
    warmup: int = 2,
    repeats: int = 5,
    bandwidth: float | None = None,
    latency: float = 0.0,
    meta: Mapping[str, Any] | None = None,
) -> CostModel:
    """Time and size every stage on one micro-batch of ``sample_input`` (a mini-batch).

    The last stage's forward includes ``loss_fn(output, target)`` on the
    matching micro-batch of ``sample_target`` (without them, the backward
    starts from a gradient of ones on the output). ``optimizer`` (default
    ``SGD(lr=0.01, momentum=0.9)``) is stepped ``warmup + repeats`` times
    with made-up gradients to time the update and to size its state.
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

            # times: forward, then backward of that forward, repeated
            fwd_times: list[float] = []
            bwd_times: list[float] = []
            for i in range(warmup + repeats):
                inp = fresh_input()
                _sync(dev)
                t0 = time.perf_counter()
                out = forward(inp)
                _sync(dev)
                t1 = time.perf_counter()
                if out.requires_grad:
                    out.backward(None if with_loss else torch.ones_like(out))
                _sync(dev)
                t2 = time.perf_counter()
                if i >= warmup:
                    fwd_times.append(t1 - t0)
                    bwd_times.append(t2 - t1)
                for p in params:
                    p.grad = None
            # an optimizer step with made-up gradients (its time does not depend on values)
            update_time = 0.0
            opt_bytes = 0
            if params:
                opt = make_opt(params)

                def step(
                    opt: torch.optim.Optimizer = opt, params: list[nn.Parameter] = params
                ) -> None:
                    for p in params:
                        p.grad = torch.full_like(p, 1e-3)
                    opt.step()

                update_time = _median_time(step, dev, warmup, repeats)
                opt_bytes = sum(
                    _nbytes(v)
                    for st in opt.state.values()
                    for v in st.values()
                    if isinstance(v, Tensor)
                )
            results.append(
                StageCost(
                    forward_time=max(statistics.median(fwd_times), 1e-9),
                    backward_time=max(statistics.median(bwd_times), 1e-9),
                    update_time=update_time,
                    output_bytes=0 if s == last else _nbytes(output),
                    weight_bytes=sum(_nbytes(p) for p in params),
                    optimizer_state_bytes=opt_bytes,
                    saved_activation_bytes=saved,
                )
            )
            x = output
            del probe
    info: dict[str, Any] = {
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
