"""A generated image classification task, deterministic from a seed.

Each class has a smooth random prototype image (random values on a coarse
7 x 7 grid, upsampled). A sample is its class prototype at a random contrast,
shifted by up to two pixels, plus Gaussian pixel noise. The noise hides the
class from a single pixel but not from a small conv net, so training on it
moves accuracy well above chance within one epoch: a quick, offline check
that a pipeline learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from timeprest.errors import ConfigError


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the generated task (the defaults are ``synthetic``)."""

    num_train: int = 2048
    num_test: int = 512
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    noise: float = 1.0
    """Std of the pixel noise; prototypes have unit std."""

    def __post_init__(self) -> None:
        for field in ("num_train", "num_test", "in_channels", "image_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"synthetic: {field} must be >= 1, got {getattr(self, field)}")
        if self.num_classes < 2:
            raise ConfigError(f"synthetic: classes must be >= 2, got {self.num_classes}")
        if self.image_size < 4:
            raise ConfigError(f"synthetic: image_size must be >= 4, got {self.image_size}")
        if self.noise < 0:
            raise ConfigError(f"synthetic: noise must be >= 0, got {self.noise}")


# Option names accepted in "synthetic:train=4096,test=1024,classes=10,channels=3,noise=0.5".
_OPTIONS = {
    "train": "num_train",
    "test": "num_test",
    "classes": "num_classes",
    "channels": "in_channels",
    "size": "image_size",
    "noise": "noise",
}


def parse_synthetic(options: str, image_size: int | None) -> SyntheticSpec:
    """The spec of ``synthetic:<options>``; ``image_size`` (when given) sets the size."""
    values: dict[str, int | float] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _OPTIONS:
            raise ConfigError(
                f"synthetic: bad option {item!r}; use key=value with keys "
                f"{', '.join(_OPTIONS)} (e.g. synthetic:train=4096,classes=10)"
            )
        field = _OPTIONS[key.strip()]
        try:
            values[field] = float(value) if field == "noise" else int(value)
        except ValueError as e:
            raise ConfigError(
                f"synthetic: option {key.strip()} needs a number, got {value!r}"
            ) from e
    if image_size is not None:
        if "image_size" in values and values["image_size"] != image_size:
            raise ConfigError(
                f"synthetic: size={values['image_size']} in the name disagrees with image_size={image_size}"
            )
        values["image_size"] = image_size
    return SyntheticSpec(**values)  # type: ignore[arg-type]


def make_synthetic(spec: SyntheticSpec, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train images, train labels, test images, test labels (float32, not normalised; int64)."""
    g = torch.Generator().manual_seed(seed)
    c, s, k = spec.in_channels, spec.image_size, spec.num_classes
    coarse = torch.randn(k, c, 7, 7, generator=g)
    protos = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    protos = (protos - protos.mean(dim=(1, 2, 3), keepdim=True)) / protos.std(
        dim=(1, 2, 3), keepdim=True
    ).clamp_min(1e-6)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        # Balanced labels in a random order.
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=g)
        x = protos[y] * contrast
        # Integer shifts of up to 2 pixels, applied per shift value (25 groups, cheap).
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                rows = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten()
                if rows.numel():
                    x[rows] = torch.roll(x[rows], shifts=(dy, dx), dims=(2, 3))
        x = x + spec.noise * torch.randn(x.shape, generator=g)
        return x.float(), y

    x_train, y_train = sample(spec.num_train)
    x_test, y_test = sample(spec.num_test)
    return x_train, y_train, x_test, y_test
