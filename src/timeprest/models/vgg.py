"""VGG-16 with BatchNorm, CIFAR variant, as a flat ``nn.Sequential`` of conv blocks."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

# Output channels of the 13 conv layers; "M" is a 2x2 max-pool after the previous conv.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def vgg16(in_channels: int, num_classes: int, image_size: int) -> nn.Sequential:
    """13 conv-BN-ReLU blocks (with each group's max-pool folded into its last block), flatten, linear.

    This is the usual CIFAR VGG-16 (one 512 -> classes linear layer, 15 M
    parameters). The five pools take 32 x 32 to 1 x 1; for smaller inputs
    a pool is skipped once the map is 1 x 1, and an adaptive average pool
    before the classifier makes any remaining map 1 x 1.
    """
    layers: list[tuple[str, nn.Module]] = []
    channels, size, group, index = in_channels, image_size, 1, 1
    block: list[nn.Module] = []
    for item in VGG16_CONFIG:
        if item == "M":
            if size >= 2:
                block.append(nn.MaxPool2d(2))
                size //= 2
            layers[-1] = (layers[-1][0], nn.Sequential(*block))
            group, index = group + 1, 1
            continue
        assert isinstance(item, int)
        block = [
            nn.Conv2d(channels, item, 3, padding=1, bias=False),
            nn.BatchNorm2d(item),
            nn.ReLU(),
        ]
        layers.append((f"conv{group}_{index}", nn.Sequential(*block)))
        channels, index = item, index + 1
    layers += [
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(channels, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
