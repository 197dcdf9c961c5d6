"""Tensors used by two stages (tied embeddings): one copy per stage (docs/design.md section 11).

:func:`apply_plan_untied` cuts a model like :func:`~timeprest.splitting.apply_plan`,
but where a Parameter sits in several stages (a language model's token
embedding reused as its output layer), the first stage keeps the Parameter
and each later stage gets its own copy, equal at the start. The places are
returned, so that the pipeline sums the copies' gradients before every update
and they stay equal. The later stages' modules are the model's own, so after
the split the model itself holds the copy in those places: it is untied.
"""

from __future__ import annotations

from torch import nn

from timeprest.errors import ConfigError
from timeprest.splitting.partition import SplitPlan, stage_modules

# one shared tensor's (stage, parameter name) places: what Pipeline(tied=...) takes
Places = tuple[tuple[int, str], ...]


def apply_plan_untied(model: nn.Module, plan: SplitPlan) -> tuple[list[nn.Module], list[Places]]:
    """The stages of ``plan`` and the (stage, name) places of each tensor they share."""
    stages = stage_modules(model, plan)
    first: dict[int, tuple[int, str]] = {}
    places: dict[int, list[tuple[int, str]]] = {}
    copies: dict[tuple[int, int], nn.Parameter] = {}  # (tensor, stage) -> that stage's copy
    for s, stage in enumerate(stages):
        for prefix, module in stage.named_modules(remove_duplicate=False):
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                owner = first.setdefault(id(p), (s, full))
                if owner[0] == s:
                    continue
                key = (id(p), s)
                if key not in copies:
                    copies[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    places.setdefault(id(p), [owner]).append((s, full))
                module._parameters[name] = copies[key]
    for s, stage in enumerate(stages):  # buffers are never copied: they still must not be shared
        for name, b in stage.named_buffers():
            owner = first.setdefault(id(b), (s, name))
            if owner[0] != s:
                raise ConfigError(
                    f"buffer {name} of stage {s} is {owner[1]} of stage {owner[0]}: keep the "
                    "layers that share it in one stage"
                )
    return stages, [tuple(group) for group in places.values()]
