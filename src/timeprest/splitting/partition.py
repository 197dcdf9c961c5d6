"""Cut a model into pipeline stages: contiguous runs of its layers.

A model's *layers* are, in order of precedence:

1. what its ``pipeline_layers(self) -> list[nn.Module]`` method returns
   (the hook for models the other two rules cannot handle),
2. the top-level children of an ``nn.Sequential``,
3. for any other module, the pieces of its ``torch.fx.symbolic_trace`` graph
   between the points where one value alone flows on: in a plain chain
   every call is a layer; a call sequence such as ``x.view(x.size(0), -1)``
   or a residual block stays in one layer.

The layers are then grouped into ``num_stages`` contiguous stages, each an
``nn.Sequential`` of the *same* module objects (parameters are shared with
the model, not copied), chosen by ``balance``:

- ``"time"``: measured forward+backward time of each layer on
  ``sample_input`` (a micro-batch), and the partition that minimises the
  slowest stage, found exactly by dynamic programming;
- ``"params"``: the same with parameter counts as the cost;
- a list of layer counts per stage, used as given.

``plan_split`` returns the choice (:class:`SplitPlan`) for the caller to
print or save; ``apply_plan`` builds the stages; ``split`` does both.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from timeprest.device import sync_device
from timeprest.errors import ConfigError

Balance = Literal["time", "params"] | Sequence[int]

HOOK_HINT = (
    "give the model a method pipeline_layers(self) -> list[nn.Module] returning its layers "
    "in order (each one's output is the next one's input), or pass an nn.Sequential"
)


class LayerTiming(NamedTuple):
    """Median seconds of one layer's forward and of its backward on the sample input."""

    forward: float
    backward: float


@dataclass(frozen=True)
class SplitPlan:
    """Which layers go to which stage, and what each stage costs."""

    layer_counts: tuple[int, ...]
    """Number of consecutive layers in each stage."""
    stage_costs: tuple[float, ...]
    """Cost of each stage: the sum of its layers' costs."""
    balance: Literal["time", "params", "counts"]
    """How the counts were chosen (``counts``: given by the caller)."""
    layer_names: tuple[str, ...]
    layer_costs: tuple[float, ...]
    cost_unit: Literal["s", "params"]
    """``s``: seconds of forward+backward on the sample input; ``params``: parameter count."""
    layer_timings: tuple[LayerTiming, ...] = ()
    """Forward and backward seconds of each layer when timed (empty otherwise), for cost models."""

    @property
    def num_stages(self) -> int:
        return len(self.layer_counts)

    def stage_layers(self, stage: int) -> range:
        """Indices of the layers of ``stage``."""
        start = sum(self.layer_counts[:stage])
        return range(start, start + self.layer_counts[stage])

    def stage_timings(self) -> tuple[LayerTiming, ...]:
        """Forward and backward seconds of each stage (sums over its layers); empty if not timed."""
        if not self.layer_timings:
            return ()
        return tuple(
            LayerTiming(
                sum(self.layer_timings[i].forward for i in self.stage_layers(s)),
                sum(self.layer_timings[i].backward for i in self.stage_layers(s)),
            )
            for s in range(self.num_stages)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (layer names per stage included)."""
        return {
            "balance": self.balance,
            "cost_unit": self.cost_unit,
            "layer_counts": list(self.layer_counts),
            "stage_costs": list(self.stage_costs),
            "stages": [
                [self.layer_names[i] for i in self.stage_layers(s)] for s in range(self.num_stages)
            ],
            "layer_costs": dict(zip(self.layer_names, self.layer_costs)),
            "stage_timings": [t._asdict() for t in self.stage_timings()],
        }


def pipeline_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named layers of ``model`` in order (see the module docstring for the rules)."""
    hook = getattr(model, "pipeline_layers", None)
    if callable(hook):
        return _hook_layers(model, hook())
    if isinstance(model, nn.Sequential):
        # Not named_children(): it skips a module that appears twice, which
        # would silently drop its second application from the forward pass.
        layers = [(name, m) for name, m in model._modules.items() if m is not None]
        if not layers:
            raise ConfigError("cannot split an empty nn.Sequential: it has no layers")
        return layers
    return _traced_layers(model)


def plan_split(
    model: nn.Module,
    num_stages: int,
    balance: Balance = "time",
    *,
    sample_input: Tensor | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 5,
) -> SplitPlan:
    """Choose how to cut ``model`` into ``num_stages`` stages (nothing is built or changed).

    ``balance="time"`` needs ``sample_input``, a batch shaped like what
    stage 0 will receive (one micro-batch); each layer runs forward and
    backward ``warmup + repeats`` times on a copy of it placed on ``device``,
    and the median of the last ``repeats`` is its cost. With a list of
    counts, stage costs are times when ``sample_input`` is given and
    parameter counts otherwise.
    """
    layers = pipeline_layers(model)
    names = tuple(name for name, _ in layers)
    n = len(layers)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ConfigError(f"num_stages must be an integer >= 1, got {num_stages!r}")
    if num_stages > n:
        raise ConfigError(
            f"num_stages ({num_stages}) exceeds the number of layers of {type(model).__name__} "
            f"({n}): use at most {n} stages, or {HOOK_HINT} with finer layers"
        )
    if isinstance(balance, str):
        if balance not in ("time", "params"):
            raise ConfigError(
                f"balance must be 'time', 'params' or a list of layer counts per stage, got {balance!r}"
            )
        if balance == "time" and sample_input is None:
            raise ConfigError(
                "balance='time' needs sample_input (a tensor shaped like one micro-batch of the "
                "input) to time each layer; or use balance='params' or a list of layer counts"
            )
    elif not isinstance(balance, (list, tuple)):
        raise ConfigError(
            f"balance must be 'time', 'params' or a list of layer counts per stage, got {balance!r}"
        )
    else:
        counts: list[int] = list(balance)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ConfigError(
                f"balance must be a list of integers (layers per stage), got {counts!r}"
            )
        if len(counts) != num_stages:
            raise ConfigError(
                f"balance has {len(counts)} entries but num_stages is {num_stages} "
                f"(balance: {counts}); give one layer count per stage"
            )
        if sum(counts) != n:
            raise ConfigError(
                f"balance sums to {sum(counts)} but the model has {n} layers "
                f"(balance: {counts}); the counts must add up to {n}"
            )
        if min(counts) < 1:
            raise ConfigError(f"every stage needs at least one layer, got balance {counts}")

    timed = balance == "time" or (not isinstance(balance, str) and sample_input is not None)
    timings: list[LayerTiming] = []
    if timed:
        assert sample_input is not None
        timings = profile_layers(
            layers, sample_input, device=device, warmup=warmup, repeats=repeats
        )
        costs = [t.forward + t.backward for t in timings]
    else:
        costs = [float(sum(p.numel() for p in layer.parameters())) for _, layer in layers]

    if isinstance(balance, str):
        layer_counts = balanced_partition(costs, num_stages)
        kind: Literal["time", "params", "counts"] = "time" if balance == "time" else "params"
    else:
        layer_counts = tuple(balance)
        kind = "counts"
    stage_costs = []
    start = 0
    for c in layer_counts:
        stage_costs.append(sum(costs[start : start + c]))
        start += c
    return SplitPlan(
        layer_counts=tuple(layer_counts),
        stage_costs=tuple(stage_costs),
        balance=kind,
        layer_names=names,
        layer_costs=tuple(costs),
        cost_unit="s" if timed else "params",
        layer_timings=tuple(timings),
    )


def apply_plan(model: nn.Module, plan: SplitPlan) -> list[nn.Module]:
    """The stages of ``plan``: one ``nn.Sequential`` per stage, sharing the model's modules."""
    layers = pipeline_layers(model)
    if sum(plan.layer_counts) != len(layers):
        raise ConfigError(
            f"the plan covers {sum(plan.layer_counts)} layers but the model has {len(layers)}; "
            f"make the plan from this model"
        )
    stages: list[nn.Module] = []
    start = 0
    for count in plan.layer_counts:
        stages.append(nn.Sequential(OrderedDict(layers[start : start + count])))
        start += count
    _check_no_shared_tensors(stages)
    return stages


def split(
    model: nn.Module,
    num_stages: int,
    balance: Balance = "time",
    *,
    sample_input: Tensor | None = None,
    device: str | torch.device = "cpu",
) -> list[nn.Module]:
    """Cut ``model`` into ``num_stages`` stages; ``plan_split`` tells the choice and costs."""
    plan = plan_split(model, num_stages, balance, sample_input=sample_input, device=device)
    return apply_plan(model, plan)


def balanced_partition(costs: Sequence[float], num_stages: int) -> tuple[int, ...]:
    """Layer counts of the contiguous partition of ``costs`` that minimises the largest stage sum.

    Exact dynamic programming, O(num_stages * n^2). Among the partitions with
    that smallest maximum, the one with the smallest sum of squared stage
    costs is returned (so the other stages are evened out too), and among
    those the one with the latest cuts, deterministically.
    """
    n = len(costs)
    k = num_stages
    assert 1 <= k <= n
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def seg(a: int, b: int) -> float:  # cost of layers a .. b-1; the same expression everywhere
        return prefix[b] - prefix[a]

    inf = float("inf")
    # worst[j][i]: smallest possible maximum stage cost of the first i layers in j stages.
    worst = [[inf] * (n + 1) for _ in range(k + 1)]
    worst[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            worst[j][i] = min(max(worst[j - 1][m], seg(m, i)) for m in range(j - 1, i))
    limit = worst[k][n]

    # Second pass: under that maximum, minimise the sum of squares; remember the cuts.
    squares = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[-1] * (n + 1) for _ in range(k + 1)]
    squares[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for m in range(j - 1, i):
                s = seg(m, i)
                # "<=": on ties the later cut wins, so a cost-free layer such as a
                # ReLU stays in the stage of the layer before it.
                if s <= limit and squares[j - 1][m] + s * s <= squares[j][i]:
                    squares[j][i] = squares[j - 1][m] + s * s
                    cut[j][i] = m
    counts: list[int] = []
    i = n
    for j in range(k, 0, -1):
        m = cut[j][i]
        assert m >= 0, "the second pass always finds the first pass's optimum"
        counts.append(i - m)
        i = m
    return tuple(reversed(counts))


def profile_layers(
    layers: Sequence[tuple[str, nn.Module]],
    sample_input: Tensor,
    *,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 5,
) -> list[LayerTiming]:
    """Median seconds of the forward and of the backward of each layer, fed with the previous layer's output.

    Each layer is timed on a deep copy moved to ``device``, so the model keeps
    its gradients, BatchNorm statistics and placement; the global RNG state is
    restored afterwards (dropout draws do not shift the caller's random stream).
    The first layer's input does not require grad, as at stage 0 of a pipeline.
    """
    if warmup < 0 or repeats < 1:
        raise ConfigError(
            f"profiling needs warmup >= 0 and repeats >= 1, got {warmup} and {repeats}"
        )
    dev = torch.device(device)
    rng_devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if dev.type == "cuda"
        else []
    )
    timings: list[LayerTiming] = []
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        x = sample_input.detach().to(dev)
        for i, (name, layer) in enumerate(layers):
            probe = copy.deepcopy(layer).to(dev)
            forward: list[float] = []
            backward: list[float] = []
            out: Any = None
            for _ in range(warmup + repeats):
                inp = x.detach()
                if i > 0 and inp.is_floating_point():
                    inp.requires_grad_(True)
                sync_device(dev)
                t0 = time.perf_counter()
                out = probe(inp)
                if not isinstance(out, Tensor):
                    raise ConfigError(
                        f"layer {name!r} returns {type(out).__name__}; pipeline layers must return one tensor"
                    )
                sync_device(dev)
                t1 = time.perf_counter()
                if out.requires_grad:
                    torch.autograd.backward(out, torch.ones_like(out))
                sync_device(dev)
                forward.append(t1 - t0)
                backward.append(time.perf_counter() - t1)
            timings.append(
                LayerTiming(
                    statistics.median(forward[warmup:]), statistics.median(backward[warmup:])
                )
            )
            x = out.detach()
            del probe
    return timings


def _hook_layers(model: nn.Module, layers: Any) -> list[tuple[str, nn.Module]]:
    what = f"{type(model).__name__}.pipeline_layers()"
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ConfigError(f"{what} must return a non-empty list of nn.Module, got {layers!r:.80}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise ConfigError(f"{what} item {i} is {type(layer).__name__}, not an nn.Module")
    # A parameter the layers leave out would never be trained by any stage.
    covered = {id(p) for layer in layers for p in layer.parameters()}
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ConfigError(
            f"{what} leaves out parameters {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; return every layer of the forward pass"
        )
    return [(str(i), layer) for i, layer in enumerate(layers)]


def _traced_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers of a non-Sequential model from its fx graph, cut where one value alone flows on."""
    what = type(model).__name__
    try:
        gm = torch.fx.symbolic_trace(model)
    # Tracing fails in many ways (control flow on tensor values, unsupported
    # calls, ...), each with its own exception type.
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot trace {what} with torch.fx ({reason}); {HOOK_HINT}") from e
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ConfigError(
            f"{what}.forward takes {len(inputs)} inputs; a pipeline passes one tensor from stage "
            f"to stage: {HOOK_HINT}"
        )
    output = next(n for n in nodes if n.op == "output")
    if not isinstance(output.args[0], torch.fx.Node):
        raise ConfigError(f"{what}.forward must return one tensor to be split; {HOOK_HINT}")
    calls = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
    if not calls:
        raise ConfigError(f"{what}.forward makes no calls: nothing to split; {HOOK_HINT}")

    # Position of each call; the input sits before the first, the output after the last.
    position = {node: i for i, node in enumerate(calls)}
    position[inputs[0]] = -1
    last_use: dict[torch.fx.Node, int] = {}
    for user in [*calls, output]:
        at = position.get(user, len(calls))
        for src in user.all_input_nodes:
            if src.op != "get_attr":  # parameters and constants are not values that flow
                last_use[src] = at

    # Walk the calls keeping the set of values still needed later; where that
    # set is exactly the value just computed, the graph can be cut there and
    # that value is all the next layer needs.
    live = {inputs[0]} if inputs[0] in last_use else set()
    segments: list[tuple[list[torch.fx.Node], torch.fx.Node]] = []  # (calls, value they hand on)
    current: list[torch.fx.Node] = []
    for i, node in enumerate(calls):
        current.append(node)
        live.add(node)
        live = {v for v in live if last_use.get(v, -1) > i}
        if live == {node}:
            segments.append((current, node))
            current = []
    if current:
        # Calls after the last cut whose results nobody uses (in-place side
        # effects, dead code): they run at the end of the last layer, as in the model.
        if not segments:
            raise ConfigError(f"{what}.forward does not return the result of a call; {HOOK_HINT}")
        segments[-1][0].extend(current)

    layers: list[tuple[str, nn.Module]] = []
    value_in = inputs[0]
    for seg, value_out in segments:
        layers.append((_segment_name(seg), _segment_module(model, gm, seg, value_in, value_out)))
        value_in = value_out
    return layers


def _segment_name(seg: list[torch.fx.Node]) -> str:
    return seg[0].name if len(seg) == 1 else f"{seg[0].name}__{seg[-1].name}"


def _segment_module(
    model: nn.Module,
    gm: torch.fx.GraphModule,
    seg: list[torch.fx.Node],
    value_in: torch.fx.Node,
    value_out: torch.fx.Node,
) -> nn.Module:
    """The module computing ``value_out`` from ``value_in`` with the calls of ``seg``."""
    only = seg[0]
    if len(seg) == 1 and only.op == "call_module" and only.args == (value_in,) and not only.kwargs:
        # A plain submodule call: use the model's own module (keeps its name and type).
        assert isinstance(only.target, str)
        return model.get_submodule(only.target)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {value_in: graph.placeholder("x")}
    for node in seg:
        for src in node.all_input_nodes:
            if src.op == "get_attr" and src not in env:
                env[src] = graph.node_copy(src)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[value_out])
    # GraphModule takes the referenced submodules, parameters and buffers from
    # the root by reference (no copies), so the stage trains the model's weights.
    return torch.fx.GraphModule(gm, graph, class_name=f"{type(model).__name__}Layer")


def _check_no_shared_tensors(stages: list[nn.Module]) -> None:
    """Tied weights in two stages would be updated by two optimizers from two versions: refuse."""
    owner: dict[int, tuple[int, str]] = {}
    for s, stage in enumerate(stages):
        named = list(stage.named_parameters()) + list(stage.named_buffers())
        for name, tensor in named:
            first = owner.setdefault(id(tensor), (s, name))
            if first[0] != s:
                raise ConfigError(
                    f"{first[1]} of stage {first[0]} and {name} of stage {s} are the same tensor "
                    f"(tied weights); keep the layers that share it in one stage (balance=[...]) "
                    f"or untie them"
                )
