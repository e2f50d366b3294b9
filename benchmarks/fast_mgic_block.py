"""A benchmark-only, inference-only re-implementation of ``MGICBlock.forward`` with the same math.

Not part of the package: it exists to measure what the proposals in
``benchmarks/README.md`` (issue 5.4) would gain. Built from a trained/initialised
:class:`mgic_transform.MGICBlock` in eval mode, it

1. folds every eval-mode BatchNorm into the convolution before it: the
   ``conv -> bn`` pairs inside each level (``torch.fx.experimental.optimization.fuse``)
   and ``N_j`` into ``P_j`` (``P_j`` gains a bias). In eval mode BN is an affine map
   per channel, so ``N(P z) = (s * P) z + b`` exactly (up to float rounding);
2. reuses buffers instead of allocating: ``y - R x`` is computed in place in ``y``
   (the output of the coarser level, dead afterwards) and the correction
   ``x_j + N(P(...))`` is added in place into the prolongation's output.

The restriction / level structure and every weight are otherwise unchanged, so
``FastMGICBlock.from_block(b)(x)`` equals ``b.eval()(x)`` to float tolerance
(checked by ``profile_mgic_block.py --prototype``). Gradients are not supported
(the in-place ops would clobber tensors autograd saves).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

import mgic_transform as mt

__all__ = ["FastMGICBlock"]


class FastMGICBlock(nn.Module):
    def __init__(self, levels: Sequence[nn.Module], restrict: Sequence[nn.Module], prolong: Sequence[nn.Module],
                 connector: Optional[nn.Module] = None, *, inplace: bool = True) -> None:
        super().__init__()
        self.connector = connector
        self.levels = nn.ModuleList(levels)
        self.restrict = nn.ModuleList(restrict)
        self.prolong = nn.ModuleList(prolong)  # N_j folded in
        self.inplace = inplace

    @classmethod
    def from_block(cls, block: mt.MGICBlock, *, fold: bool = True, inplace: bool = True) -> "FastMGICBlock":
        block = copy.deepcopy(block).eval()
        levels, prolong = list(block.levels), []
        if fold:
            levels = [fx_fuse(lv) if isinstance(lv, torch.fx.GraphModule) else lv for lv in levels]
            for p, n in zip(block.prolong, block.norms):
                if isinstance(p, nn.modules.conv._ConvNd) and isinstance(n, nn.modules.batchnorm._BatchNorm):
                    prolong.append(fuse_conv_bn_eval(p, n))
                else:
                    prolong.append(nn.Sequential(p, n))
        else:
            prolong = [nn.Sequential(p, n) for p, n in zip(block.prolong, block.norms)]
        return cls(levels, list(block.restrict), prolong, block.connector, inplace=inplace).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("FastMGICBlock is an inference-only benchmark prototype")
        if self.connector is not None:
            x = self.connector(x)
        xs = [x]
        for restrict in self.restrict:
            xs.append(restrict(xs[-1]))
        y = self.levels[-1](xs[-1])
        for j in range(len(self.restrict) - 1, -1, -1):
            restricted = xs.pop()
            if self.inplace:
                z = self.prolong[j](y.sub_(restricted))
                y = self.levels[j](z.add_(xs[-1]))
            else:
                y = self.levels[j](xs[-1] + self.prolong[j](y - restricted))
        return y
