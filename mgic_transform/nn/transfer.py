"""Grid-transfer operators (restriction R, prolongation P) and the grouped layers they share.

Paper Sec. 3.3.3: ``R_j`` is a grouped 1x1 convolution that halves the channels,
``P_j`` has the transposed structure, both learned and initialised with positive
weights whose rows sum to 1 (so repeated restriction neither vanishes nor
explodes at the start of training). For channels-first tensors with spatial
dimensions they are ``nn.Conv{1,2,3}d`` with kernel 1 (the fastest grouped
kernel PyTorch has); for channels-last or ``(N, C)`` tensors they are a
:class:`GroupedLinear`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupedLinear", "ChannelBatchNorm", "make_transfer", "make_residual_norm", "init_transfer_"]

CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_BY_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class GroupedLinear(nn.Module):
    """A block-diagonal ``nn.Linear`` on the last dimension: ``groups`` independent linear maps.

    ``GroupedLinear(in, out, 1)`` computes exactly what ``nn.Linear(in, out)`` does.
    The weight has shape ``(groups, out // groups, in // groups)``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide in_features={in_features} and out_features={out_features}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The init ``nn.Linear`` uses, per group (fan-in is the group's input width)."""
        bound = 1.0 / math.sqrt(self.in_features // self.groups)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight[0], self.bias)
        g, o, i = self.weight.shape
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (g, i)), self.weight).flatten(-2)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, bias={self.bias is not None}"


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the *last* dimension of a channels-last tensor of any rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


@torch.no_grad()
def init_transfer_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Positive weights with every row (one output channel over its ``fan_in`` group inputs) summing to 1."""
    rows = torch.rand(weight.numel() // fan_in, fan_in, dtype=weight.dtype, device=weight.device) + 0.5
    rows /= rows.sum(dim=1, keepdim=True)
    weight.copy_(rows.reshape(weight.shape))
    return weight


def make_transfer(in_ch: int, out_ch: int, groups: int, *, spatial_dims: int, channels_last: bool,
                  like: torch.Tensor | None = None) -> nn.Module:
    """A grouped 1x1 transfer operator ``in_ch -> out_ch`` (no bias), initialised per the paper."""
    kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    if channels_last or spatial_dims == 0:
        op: nn.Module = GroupedLinear(in_ch, out_ch, groups, bias=False, **kw)
    else:
        op = CONV_BY_DIMS[spatial_dims](in_ch, out_ch, 1, groups=groups, bias=False, **kw)
    init_transfer_(op.weight, in_ch // groups)
    return op


def make_residual_norm(channels: int, *, spatial_dims: int, channels_last: bool,
                       like: torch.Tensor | None = None) -> nn.Module:
    """The BatchNorm ``N_j`` applied to the prolonged coarse-grid residual."""
    kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    if channels_last:
        return ChannelBatchNorm(channels, **kw)
    return BN_BY_DIMS[max(spatial_dims, 1)](channels, **kw)
