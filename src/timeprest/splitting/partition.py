"""Cut a model into pipeline stages: contiguous runs of its layers.

The layers (see :mod:`timeprest.splitting.layers`) are grouped into
``num_stages`` contiguous stages, each an ``nn.Sequential`` of the *same*
module objects (parameters are shared with the model, not copied), chosen
by ``balance``:

- ``"params"`` (the default): parameter counts as the cost, and the
  partition that minimises the largest stage, found exactly by dynamic
  programming; the same model gives the same split on every machine;
- ``"time"``: measured forward+backward time of each layer on
  ``sample_input`` (a micro-batch; derived from the first layer where that
  is unambiguous), with the same partition rule; often a faster pipeline,
  but the split may differ between machines and runs;
- a list of layer counts per stage, used as given.

``plan_split`` returns the choice (:class:`SplitPlan`) for the caller to
print or save; ``apply_plan`` builds the stages; ``split`` does both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from timeprest.errors import ConfigError
from timeprest.splitting.layers import HOOK_HINT, layer_paths, pipeline_layers
from timeprest.splitting.profile import LayerTiming, profile_layers, sample_input_for

Balance = Literal["time", "params"] | Sequence[int]


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
    layer_paths: tuple[str | None, ...] = ()
    """Where each layer's state sits in the model (see ``layers.layer_paths``; ``None``: unknown)."""
    model_keys: tuple[str, ...] = ()
    """The keys of the model's ``state_dict()``, in order: what an export must give back."""

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
        """A JSON-ready description (layer names per stage included).

        ``stages[s][i]`` names layer ``i`` of stage ``s`` (stage ``s``'s
        ``state_dict`` key ``"{name}.{rest}"``), ``layer_paths[s][i]`` is
        where that layer sits in the model (its key is ``"{path}.{rest}"``,
        just ``rest`` for the path ``""``; ``null`` where unknown), and
        ``model_keys`` the keys of the model's ``state_dict()``: enough for
        ``timeprest.export`` to rebuild the model's state from the stages'.
        """
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
            "layer_paths": [
                [self.layer_paths[i] for i in self.stage_layers(s)] for s in range(self.num_stages)
            ]
            if self.layer_paths
            else [],
            "model_keys": list(self.model_keys),
        }


def plan_split(
    model: nn.Module,
    num_stages: int,
    balance: Balance = "params",
    *,
    sample_input: Tensor | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 5,
) -> SplitPlan:
    """Choose how to cut ``model`` into ``num_stages`` stages (nothing is built or changed).

    ``balance="time"`` times each layer on ``sample_input``, a batch shaped
    like what stage 0 will receive (one micro-batch): forward and backward
    ``warmup + repeats`` times on a copy placed on ``device``, the median of
    the last ``repeats`` being its cost. Without ``sample_input`` one is
    derived where the first layer fixes the input shape (a ``Linear``);
    otherwise a ConfigError asks for it. With a list of counts, stage costs
    are times when ``sample_input`` is given and parameter counts otherwise.
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
            sample_input = sample_input_for(layers)
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
        layer_paths=layer_paths(model, layers),
        model_keys=tuple(model.state_dict().keys()),
    )


def apply_plan(model: nn.Module, plan: SplitPlan) -> list[nn.Module]:
    """The stages of ``plan``: one ``nn.Sequential`` per stage, sharing the model's modules."""
    stages = stage_modules(model, plan)
    _check_no_shared_tensors(stages)
    return stages


def stage_modules(model: nn.Module, plan: SplitPlan) -> list[nn.Module]:
    """The stages of ``plan``, unchecked (a tensor may sit in two of them)."""
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
    return stages


def split(
    model: nn.Module,
    num_stages: int,
    balance: Balance = "params",
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
