"""ResNets as flat ``nn.Sequential`` of blocks, so a pipeline can cut between any two blocks.

``resnet18`` is the CIFAR variant of He et al. (2016): a 3x3 stem without
max-pool, four stages of two basic blocks (64, 128, 256, 512 channels,
strides 1, 2, 2, 2), global average pool and one linear layer. ``resnet50``
is torchvision's ImageNet model, unrolled into its bottleneck blocks.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from timeprest.errors import ConfigError


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # A projection only where the shape changes (option B of the paper).
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Sequential:
    """CIFAR ResNet-18 (11.2 M parameters for 10 classes); children: stem, 8 blocks, pool, flatten, fc."""
    del image_size  # global average pooling makes the head independent of the input size
    layers: list[tuple[str, nn.Module]] = [
        (
            "stem",
            nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
            ),
        )
    ]
    in_planes = 64
    for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for i in range(2):
            layers.append(
                (f"layer{stage}_{i}", BasicBlock(in_planes, planes, stride if i == 0 else 1))
            )
            in_planes = planes
    layers += [
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(512, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def resnet50(in_channels: int, num_classes: int, image_size: int) -> nn.Sequential:
    """torchvision's ResNet-50 (random weights), unrolled: stem layers, 16 bottlenecks, pool, flatten, fc.

    The ImageNet stem (7x7 stride-2 conv and max-pool) is kept, so inputs
    should be large (224 is the usual size); a different ``in_channels``
    replaces the first conv.
    """
    del image_size  # adaptive average pooling: any input size >= 32 works
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except ImportError as e:
        raise ConfigError(
            "model resnet50 needs torchvision: pip install timeprest[vision] (or pip install torchvision)"
        ) from e
    net = tv_resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", net.conv1),
        ("bn1", net.bn1),
        ("relu", net.relu),
        ("maxpool", net.maxpool),
    ]
    for stage in range(1, 5):
        for i, block in enumerate(getattr(net, f"layer{stage}")):
            layers.append((f"layer{stage}_{i}", block))
    layers += [("avgpool", net.avgpool), ("flatten", nn.Flatten()), ("fc", net.fc)]
    return nn.Sequential(OrderedDict(layers))
