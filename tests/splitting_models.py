"""Models the splitting tests cut: a Sequential, traced chains, a hooked and an untraceable one."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def run_stages(stages: list[nn.Module], x: Tensor) -> Tensor:
    for stage in stages:
        x = stage(x)
    return x


def seq_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 32),
        nn.Dropout(0.2),
        nn.ReLU(),
        nn.Linear(32, 5),
    )


class Chain(nn.Module):
    """Not a Sequential, but a plain chain: every call is a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x))
        x = self.fc2(x).tanh()
        return self.fc3(x)


class Mixed(nn.Module):
    """A residual add and ``view(size(0), -1)``: those calls must stay together."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.inner = nn.Conv2d(3, 3, 3, padding=1)
        self.scale = nn.Parameter(torch.full((1,), 2.0))
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x))
        x = x + self.inner(x)
        x = x.view(x.size(0), -1) * self.scale
        return self.fc(x)


class WholeResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(self.a(x))


class Branchy(nn.Module):
    """Control flow on tensor values: fx cannot trace it, the hook can split it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


class Hooked(Branchy):
    def forward(self, x: Tensor) -> Tensor:  # data dependence would defeat tracing
        return self.b(self.a(x)) if x.sum() > -1e9 else x

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.a, self.b]
