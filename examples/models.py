"""Small reference CNNs used by the examples, tests and benchmarks.

Only ``torch`` is needed; import this file directly (``sys.path`` insert of ``examples/``)
or run the examples next to it.

* :func:`cifar_resnet` / :func:`resnet20` / :func:`resnet56`: the CIFAR ResNets of
  He et al. (2016, Sec. 4.2): a 3x3 stem to 16 channels, three stages of ``n = (depth-2)/6``
  :class:`BasicBlock` units of widths 16/32/64 (stride 2 at the first unit of stages 2
  and 3), global average pooling and one linear layer. ``shortcut="A"`` (default, as in
  He et al. and the paper's Table 3: 0.27M / 0.85M parameters for ResNet-20 / 56) uses the
  parameter-free subsample-and-zero-pad shortcut when the width changes; ``shortcut="B"``
  uses a 1x1 convolution + BatchNorm projection instead.
* :class:`FunctionApproxNet`: the network of the paper's Table 2 (Sec. 4.2) for learning
  ``f(x, y, a, b, c) = a cos(bx) sin(cy)`` from the 5 inputs, treated as a 5-channel 1x1
  image, with MobileNetV3 inverted-residual blocks (:class:`InvertedResidual`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "PadShortcut",
    "CifarResNet",
    "cifar_resnet",
    "resnet20",
    "resnet56",
    "SqueezeExcite",
    "InvertedResidual",
    "FunctionApproxNet",
]


# --------------------------------------------------------------------------- CIFAR ResNet
def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: spatial subsampling by ``stride``, channels zero-padded
    (symmetrically) from ``c_in`` to ``c_out``. No parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"PadShortcut needs c_out >= c_in, got {c_in} -> {c_out}")
        self.c_in, self.c_out, self.stride = c_in, c_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.c_out - self.c_in
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.c_in}, {self.c_out}, stride={self.stride}"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(c_in, c_out, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth ``6n + 2``), widths ``widths`` (default 16/32/64)."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110 ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c, w, stride, shortcut))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def cifar_resnet(depth: int = 20, **kwargs) -> CifarResNet:
    """CIFAR ResNet of the given depth (20, 32, 44, 56, 110); kwargs go to :class:`CifarResNet`."""
    return CifarResNet(depth=depth, **kwargs)


def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(depth=20, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(depth=56, **kwargs)


# ----------------------------------------------------------- Table 2 function approximation
class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-and-excitation: ``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck ("bneck"): 1x1 expand + BN + hardswish, depthwise
    ``dw_kernel`` x ``dw_kernel`` + BN + hardswish, optional SE, 1x1 project + BN, plus the
    input when ``c_in == c_out`` (and stride 1).

    The hidden width is ``expansion * c_in`` (MobileNetV2 convention). On the 1x1 "images" of
    the function approximation experiment a 3x3 depthwise convolution with padding 1 only
    ever uses its centre tap, so ``dw_kernel=1`` (the default there) is the same function
    without the 8 dead weights per channel.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        expansion: int = 4,
        se: bool = False,
        dw_kernel: int = 1,
        stride: int = 1,
    ) -> None:
        super().__init__()
        hidden = expansion * c_in
        self.use_residual = c_in == c_out and stride == 1
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(
            hidden, hidden, dw_kernel, stride=stride, padding=dw_kernel // 2, groups=hidden, bias=False
        )
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.hardswish(self.bn1(self.expand(x)))
        out = F.hardswish(self.bn2(self.dw(out)))
        out = self.se(out)
        out = self.bn3(self.project(out))
        if self.use_residual:
            out = out + x
        return out


class FunctionApproxNet(nn.Module):
    """The paper's Table 2 network for a 5-vector input seen as a ``(N, 5, 1, 1)`` image.

    ``1x1 conv 5->16 + BN + ReLU``; then for every width ``w = 32, 64, ..., c_max`` two CNN
    blocks (``c_prev -> w`` and ``w -> w``, expansion 4); ``1x1 conv c_max->64 + BN + ReLU``;
    ``1x1 conv 64->1``. ``c_max`` must be a power of two >= 32. Input ``(N, 5, 1, 1)``, output ``(N, 1, 1, 1)``.

    ``width_mult < 1`` is the *thin* baseline: the same architecture with every width (stem,
    blocks, head) multiplied by it and rounded, the network a user would otherwise shrink to.
    """

    def __init__(
        self,
        c_max: int = 128,
        expansion: int = 4,
        se: bool = False,
        dw_kernel: int = 1,
        in_features: int = 5,
        stem_width: int = 16,
        head_width: int = 64,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        if c_max < 32 or c_max & (c_max - 1):
            raise ValueError(f"c_max must be a power of two >= 32, got {c_max}")
        if not 0 < width_mult <= 1:
            raise ValueError(f"width_mult must be in (0, 1], got {width_mult}")

        def scaled(w: int) -> int:  # the thin baseline: every width times width_mult, at least 1 channel
            return max(1, round(w * width_mult))

        stem_width, head_width = scaled(stem_width), scaled(head_width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_features, stem_width, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU()
        )
        blocks = []
        c, w = stem_width, 32
        while w <= c_max:
            blocks.append(InvertedResidual(c, scaled(w), expansion, se, dw_kernel))
            blocks.append(InvertedResidual(scaled(w), scaled(w), expansion, se, dw_kernel))
            c, w = scaled(w), 2 * w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(c, head_width, 1, bias=False), nn.BatchNorm2d(head_width), nn.ReLU()
        )
        self.out = nn.Conv2d(head_width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.blocks(self.stem(x))))
