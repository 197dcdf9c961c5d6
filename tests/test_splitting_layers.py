"""A model's layers: Sequential children, fx-traced segments, the hook; and where each sits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitting_models import Branchy, Chain, Hooked, Mixed, WholeResidual, run_stages, seq_model
from timeprest.errors import ConfigError
from timeprest.splitting import layer_paths, pipeline_layers, split


def test_sequential_layers_are_its_children() -> None:
    model = seq_model()
    layers = pipeline_layers(model)
    assert [name for name, _ in layers] == [str(i) for i in range(9)]
    assert all(a is b for (_, a), b in zip(layers, model))


def test_traced_chain() -> None:
    model = Chain()
    layers = pipeline_layers(model)
    assert [name for name, _ in layers] == ["fc1", "relu", "fc2", "tanh", "fc3"]
    assert layers[0][1] is model.fc1 and layers[4][1] is model.fc3
    x = torch.randn(5, 6)
    stages = split(model, 3, [2, 2, 1])
    assert torch.equal(run_stages(stages, x), model(x))


def test_traced_model_keeps_dependent_calls_together() -> None:
    model = Mixed()
    names = [name for name, _ in pipeline_layers(model)]
    assert names == ["conv", "relu", "inner__add", "size__view", "mul", "fc"]
    torch.manual_seed(1)
    x = torch.randn(3, 2, 8, 8)
    stages = split(model, 3, "params")
    assert torch.equal(run_stages(stages, x), model(x))
    # The parameter read by a function call comes along with its layer, shared, not copied.
    owners = [s for s in stages if any(p is model.scale for p in s.parameters())]
    assert len(owners) == 1


def test_untraceable_model_points_to_the_hook() -> None:
    with pytest.raises(
        ConfigError, match=r"cannot trace Branchy with torch.fx .*pipeline_layers\(self\)"
    ):
        split(Branchy(), 2, "params")


def test_one_segment_model_cannot_take_two_stages() -> None:
    assert len(pipeline_layers(WholeResidual())) == 1
    with pytest.raises(
        ConfigError,
        match=r"num_stages \(2\) exceeds the number of layers of WholeResidual \(1\).*pipeline_layers",
    ):
        split(WholeResidual(), 2, "params")


def test_hook() -> None:
    model = Hooked()
    stages = split(model, 2, "params")
    assert list(stages[0].children()) == [model.a] and list(stages[1].children()) == [model.b]
    x = torch.randn(2, 4)
    assert torch.equal(run_stages(stages, x), model(x))

    class Forgetful(Hooked):
        def pipeline_layers(self) -> list[nn.Module]:
            return [self.a]

    with pytest.raises(ConfigError, match=r"leaves out parameters b.weight, b.bias"):
        split(Forgetful(), 1, "params")

    class Wrong(Hooked):
        def pipeline_layers(self) -> list[nn.Module]:
            return [self.a, torch.relu]  # type: ignore[list-item]

    with pytest.raises(ConfigError, match="item 1 is builtin_function_or_method, not an nn.Module"):
        split(Wrong(), 1, "params")


# ---------------------------------------------------------------- where each layer sits


class Nested(nn.Module):
    """A traced model calling a submodule of a submodule: its path is the qualified name."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block[0](x)))


def test_layer_paths_are_where_the_state_sits_in_the_model() -> None:
    model = seq_model()
    assert layer_paths(model, pipeline_layers(model)) == tuple(str(i) for i in range(9))
    # traced: a plain submodule call sits at its name; a segment holds the model's own keys
    chain = Chain()
    assert layer_paths(chain, pipeline_layers(chain)) == ("fc1", "", "fc2", "", "fc3")
    mixed = Mixed()
    layers = pipeline_layers(mixed)
    assert layer_paths(mixed, layers) == ("conv", "", "", "", "", "fc")
    assert set(layers[2][1].state_dict()) == {"inner.weight", "inner.bias"}
    assert set(layers[4][1].state_dict()) == {"scale"}
    nested = Nested()
    assert layer_paths(nested, pipeline_layers(nested)) == ("block.0", "", "head")
    hooked = Hooked()
    assert layer_paths(hooked, pipeline_layers(hooked)) == ("a", "b")


def test_a_layer_that_is_not_the_models_module_has_no_path() -> None:
    class Wrapping(Hooked):
        def pipeline_layers(self) -> list[nn.Module]:
            return [nn.Sequential(self.a), self.b]  # a new module around a: not in the model

    model = Wrapping()
    assert layer_paths(model, pipeline_layers(model)) == (None, "b")
