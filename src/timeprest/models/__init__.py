"""Models as ``nn.Sequential`` whose top-level children are the units a pipeline splits.

``build_model(name, in_channels=..., num_classes=..., image_size=...)`` with
``name`` one of ``MODEL_NAMES``: ``mlp``, ``cnn`` (small, for 28 x 28
inputs), ``resnet18`` and ``vgg16`` (CIFAR variants with BatchNorm),
``resnet50`` (torchvision's, needs ``pip install timeprest[vision]``), and
``gpt`` (a byte-level transformer language model; its sizes come from
``options``, the image shape is ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from timeprest.errors import ConfigError
from timeprest.models.gpt import GPT, gpt, lm_loss, parse_model_options
from timeprest.models.resnet import BasicBlock, resnet18, resnet50
from timeprest.models.small import cnn, mlp
from timeprest.models.vgg import vgg16

_BUILDERS: dict[str, Callable[[int, int, int], nn.Sequential]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "resnet50": resnet50,
}

MODEL_NAMES = (*_BUILDERS, "gpt")
DEFAULT_MODEL = "cnn"


def check_model_name(name: str) -> None:
    """ConfigError unless ``name`` is one of :data:`MODEL_NAMES`."""
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    options: Mapping[str, int | float | bool] | None = None,
) -> nn.Module:
    """A freshly initialised model (from the global torch RNG: seed it first for reproducible weights).

    ``options`` are the model's own settings (``--model-opt``); only ``gpt`` has any.
    """
    if name == "gpt":
        return gpt(**dict(options or {}))  # type: ignore[arg-type]
    if options:
        raise ConfigError(f"model {name} takes no --model-opt (only gpt does), got {dict(options)}")
    check_model_name(name)
    for field, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        if value < 1:
            raise ConfigError(f"model {name}: {field} must be >= 1, got {value}")
    return _BUILDERS[name](in_channels, num_classes, image_size)


__all__ = [
    "DEFAULT_MODEL",
    "MODEL_NAMES",
    "GPT",
    "BasicBlock",
    "build_model",
    "cnn",
    "gpt",
    "lm_loss",
    "mlp",
    "parse_model_options",
    "resnet18",
    "resnet50",
    "vgg16",
]
