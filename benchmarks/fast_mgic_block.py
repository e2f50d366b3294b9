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
   ``x_j + N(P(...))`` is added in place into the prolongation's output;
3. runs every *grouped 1x1* convolution (``R_j``, ``P_j`` and the grouped 1x1 layers
   of the fine levels) as one broadcast batched matmul on the NCHW tensor viewed as
   ``(N, G, C/G, H*W)`` (:class:`GroupedPointwise`). With one intra-op thread PyTorch
   sends 1x1 convolutions to its "slow" (THNN) kernel, which runs a grouped conv
   as a Python-invisible loop over groups: ``narrow`` + ``contiguous`` copy of every
   group's input, one GEMM per group and per image, then ``cat``; the matmul needs
   no copy. Channels-last inputs fall back to the convolution.

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

__all__ = ["FastMGICBlock", "GroupedPointwise", "fold_bn_in_graph"]


def fold_bn_in_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold ``call_module`` conv -> BatchNorm pairs of ``gm``'s own graph (eval mode), in place, without retracing.

    ``torch.fx.experimental.optimization.fuse`` retraces the model, which would trace
    into the blocks; this works on the existing graph and leaves every ``call_module``
    it does not fold (an MGICBlock, a FastMGICBlock) alone.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                and isinstance(modules.get(prev.target), nn.modules.conv._ConvNd) and len(prev.users) == 1):
            continue
        conv, bn = modules[prev.target], modules[node.target]
        if not bn.track_running_stats:
            continue
        gm.set_submodule(prev.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


class GroupedPointwise(nn.Module):
    """A grouped 1x1 ``Conv2d`` (stride 1, no padding) computed as a broadcast matmul over groups."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        g, o, i = conv.groups, conv.out_channels // conv.groups, conv.in_channels // conv.groups
        self.register_buffer("w", conv.weight.detach().reshape(g, o, i).clone(), persistent=False)
        self.groups = g

    @staticmethod
    def applies(m: nn.Module) -> bool:
        return (type(m) is nn.Conv2d and m.groups > 1 and m.kernel_size == (1, 1) and m.stride == (1, 1)
                and m.padding == (0, 0) and m.dilation == (1, 1) and m.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            return self.conv(x)
        n, c, h, w = x.shape
        y = torch.matmul(self.w, x.view(n, self.groups, c // self.groups, h * w)).view(n, -1, h, w)
        if self.conv.bias is not None:
            y = y + self.conv.bias.view(1, -1, 1, 1)
        return y


def _pointwise_as_matmul(module: nn.Module) -> nn.Module:
    if GroupedPointwise.applies(module):
        return GroupedPointwise(module)
    for name, child in list(module.named_children()):
        new = _pointwise_as_matmul(child)
        if new is not child:
            setattr(module, name, new)
    return module


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
    def from_block(cls, block: mt.MGICBlock, *, fold: bool = True, inplace: bool = True,
                   matmul_1x1: bool = True) -> "FastMGICBlock":
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
        restrict = list(block.restrict)
        if matmul_1x1:
            levels = [_pointwise_as_matmul(lv) for lv in levels]
            restrict = [_pointwise_as_matmul(r) for r in restrict]
            prolong = [_pointwise_as_matmul(p) for p in prolong]
        return cls(levels, restrict, prolong, block.connector, inplace=inplace).eval()

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
