"""The layers of a model: the units a split groups into stages.

A model's *layers* are, in order of precedence:

1. what its ``pipeline_layers(self) -> list[nn.Module]`` method returns
   (the hook for models the other two rules cannot handle),
2. the top-level children of an ``nn.Sequential``,
3. for any other module, the pieces of its ``torch.fx.symbolic_trace`` graph
   between the points where one value alone flows on: in a plain chain
   every call is a layer; a call sequence such as ``x.view(x.size(0), -1)``
   or a residual block stays in one layer.

Each layer also has a *path* (:func:`layer_paths`): where its parameters and
buffers sit in the model, so that a stage's ``state_dict`` keys can be turned
back into the model's own keys (``timeprest.export``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from timeprest.errors import ConfigError

HOOK_HINT = (
    "give the model a method pipeline_layers(self) -> list[nn.Module] returning its layers "
    "in order (each one's output is the next one's input), or pass an nn.Sequential"
)


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


def layer_paths(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> tuple[str | None, ...]:
    """Where each layer's state sits in ``model``: its key ``k`` is the model's ``{path}.{k}``.

    A layer that is a submodule of the model has its qualified name as path;
    a traced segment holds the model's submodules and parameters under their
    own qualified names, so its path is ``""`` (its keys are the model's keys).
    Every path is checked tensor by tensor against ``model.state_dict()``; a
    layer whose state cannot be found that way (a hook that returns new
    wrapper modules, say) gets ``None``, and its stage cannot be exported.
    """
    model_state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)

    def fits(path: str, layer: nn.Module) -> bool:
        return all(
            model_state.get(join_key(path, key)) is tensor
            for key, tensor in layer.state_dict(keep_vars=True).items()
        )

    found: list[str | None] = []
    for _, layer in layers:
        candidates = names.get(id(layer), [])
        if isinstance(layer, torch.fx.GraphModule) and id(layer) not in names:
            candidates = [""]
        found.append(next((p for p in candidates if fits(p, layer)), None))
    return tuple(found)


def join_key(path: str, key: str) -> str:
    """The model's key of a layer's state ``key`` for a layer at ``path``."""
    return f"{path}.{key}" if path else key
