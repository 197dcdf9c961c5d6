"""Models: each builds, runs a forward of the right shape, and is a splittable nn.Sequential."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from timeprest.data import load_dataset, make_batches
from timeprest.errors import ConfigError, DataError
from timeprest.models import MODEL_NAMES, build_model
from timeprest.splitting import split


@pytest.mark.parametrize(
    "name, in_channels, image_size, num_classes, min_layers",
    [
        ("mlp", 1, 28, 10, 6),
        ("cnn", 1, 28, 10, 12),
        ("cnn", 3, 32, 7, 12),
        ("resnet18", 3, 32, 10, 12),
        ("resnet18", 1, 28, 10, 12),
        ("vgg16", 3, 32, 100, 16),
        ("vgg16", 1, 28, 10, 16),
    ],
)
def test_builds_and_runs(
    name: str, in_channels: int, image_size: int, num_classes: int, min_layers: int
) -> None:
    torch.manual_seed(0)
    model = build_model(
        name, in_channels=in_channels, num_classes=num_classes, image_size=image_size
    )
    assert isinstance(model, nn.Sequential) and len(model) >= min_layers
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, num_classes)
    assert len(split(model, 4, "params")) == 4


def test_known_sizes() -> None:
    def count(name: str) -> int:
        m = build_model(name, in_channels=3, num_classes=10, image_size=32)
        return sum(p.numel() for p in m.parameters())

    assert count("resnet18") == 11_173_962  # the CIFAR ResNet-18 of the literature
    # VGG-16-BN with a 512 -> 10 head; convs without bias (BatchNorm follows each).
    assert count("vgg16") == 14_724_042


def test_resnet50_needs_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ConfigError, match=r"pip install timeprest\[vision\]"):
        build_model("resnet50", in_channels=3, num_classes=10, image_size=224)


def test_resnet50_with_torchvision() -> None:
    pytest.importorskip("torchvision")
    model = build_model("resnet50", in_channels=1, num_classes=5, image_size=64)
    assert len(model) == 4 + 16 + 3
    assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_bad_names_and_sizes() -> None:
    with pytest.raises(
        ConfigError, match="unknown model 'resnet'; valid names: " + ", ".join(MODEL_NAMES)
    ):
        build_model("resnet", in_channels=1, num_classes=10, image_size=28)
    with pytest.raises(ConfigError, match="num_classes must be >= 1, got 0"):
        build_model("mlp", in_channels=1, num_classes=0, image_size=28)
    with pytest.raises(ConfigError, match="image_size >= 4"):
        build_model("cnn", in_channels=1, num_classes=10, image_size=3)


def test_cnn_learns_synthetic_in_one_epoch() -> None:
    torch.manual_seed(0)
    data = load_dataset("synthetic:train=512,test=256", seed=0)  # small, to keep the test fast
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in make_batches(data.train, 16, seed=0):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1; about 0.9 is typical


@pytest.mark.slow
def test_cnn_reaches_88_percent_on_fashion_mnist() -> None:
    """Two epochs of plain SGD on the real data, when it is on this machine (about 1-2 minutes)."""
    try:
        data = load_dataset("fashion-mnist", download=False)
    except DataError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        for x, y in make_batches(data.train, 64, seed=0, epoch=epoch):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = sum(
            int((model(x).argmax(1) == y).sum())
            for x, y in make_batches(data.test, 1000, shuffle=False)
        )
    assert correct / len(data.test) >= 0.88
