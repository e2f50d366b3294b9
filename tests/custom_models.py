"""Architectures of the kinds users write by hand, for the compiler's tests.

None of them is built from a torchvision block class: residuals are written
inline, squeeze-excite is hand-rolled, point clouds use Conv1d, MLPs use
Linear + LayerNorm on channels-last tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import resnet56  # noqa: E402  (CIFAR ResNet-56 of He et al., shared with the examples)


class Tiny(nn.Module):
    """stem -> one residual unit (rewritable with group_size=4, coarsest_width=4) -> head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn(self.conv(x))
        return self.head(x.mean((2, 3)))


class PlainVGG(nn.Sequential):
    """A VGG-style nn.Sequential without residuals (conv-bn-relu, equal widths within a stage)."""

    def __init__(self, widths=(64, 64, 128, 128, 256, 256), num_classes: int = 10) -> None:
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        super().__init__(*layers)


class InlineResNet(nn.Module):
    """Residual units written inline in forward(): no block submodule exists."""

    def __init__(self, width: int = 96, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.c1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(width)
        self.c3 = nn.Conv2d(width, width, 1, bias=False)
        self.b3 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = x + self.b3(self.c3(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class IRBlock(nn.Module):
    """MobileNetV3-style inverted residual: expand, depthwise, squeeze-excite, project, hardswish."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.se = SE(h)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.dw(self.expand(x))))


class MobileSE(nn.Module):
    def __init__(self, width: int = 80, depth: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.Hardswish())
        self.blocks = nn.Sequential(*[IRBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class PointNet(nn.Module):
    """Point-cloud classifier: shared per-point MLP as Conv1d, with equal-width residual layers."""

    def __init__(self, width: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Conv1d(3, width, 1), nn.BatchNorm1d(width), nn.ReLU())
        self.l1 = nn.Sequential(nn.Conv1d(width, width, 1), nn.BatchNorm1d(width), nn.ReLU())
        self.l2 = nn.Sequential(nn.Conv1d(width, width, 1), nn.BatchNorm1d(width), nn.ReLU())
        self.res = nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        x = self.l2(self.l1(self.inp(pts)))
        x = F.relu(x + self.res(x))
        return self.head(x.max(dim=2).values)


class ResidualMLP(nn.Module):
    """Residual MLP on channels-last tokens: x + W2 gelu(W1 LN(x))."""

    def __init__(self, dim: int = 128, hidden: int = 256, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, 16)
        x = self.embed(x)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(F.gelu(fc1(norm(x))))
        return self.head(x.mean(1))


# name -> (constructor, example input shape, group_size, coarsest_width)
CUSTOM_MODELS = {
    "cifar_resnet56": (resnet56, (2, 3, 32, 32), 8, 16),
    "plain_vgg": (PlainVGG, (2, 3, 32, 32), 16, 32),
    "inline_resnet": (InlineResNet, (2, 3, 32, 32), 16, 32),
    "mobile_se": (MobileSE, (2, 3, 32, 32), 16, 32),
    "pointnet": (PointNet, (2, 3, 256), 16, 32),
    "residual_mlp": (ResidualMLP, (2, 8, 16), 16, 32),
}
