"""Inference-time folding: the same network, fewer ops.

An MGIC network runs many more (smaller) ops than the original, so per-op
overhead matters on CPU. In eval mode a BatchNorm is a per-channel affine map
and folds exactly (up to float rounding) into the convolution before it: inside
every block level, ``N_j`` into ``P_j``, and in the rest of the graph.
``benchmarks/profile_mgic_block.py --ablation`` measures the effect on the MGIC
ResNet-50 (``benchmarks/results/profile_mgic_block.md``: 610 vs 707 ms, batch 8,
one thread).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layers import absorbs_batchnorm, is_foldable_batchnorm
from .nn.mgic_block import MGICBlock
from .passes.ownership import mark_overwritable_inputs
from .tracing import trace

__all__ = ["fold_batchnorm"]


def _fold_graph(gm: torch.fx.GraphModule) -> None:
    """Fold every ``conv -> bn`` call_module pair of ``gm``'s own graph (the conv feeding only the BN)."""
    changed = False
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_foldable_batchnorm(gm.get_submodule(node.target)):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = gm.get_submodule(src.target), gm.get_submodule(node.target)
        if not absorbs_batchnorm(conv) or not bn.track_running_stats or bn.running_mean is None:
            continue
        if calls[src.target] != 1:
            continue  # a conv module called twice cannot absorb one of its BNs
        gm.add_submodule(str(src.target), fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        mark_overwritable_inputs(gm)  # a folded BN's conv now makes the tensor a block may overwrite
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorms folded into the convolutions before them.

    Works on the result of :func:`mgic_transform.mgicify` (and on any module
    tree of GraphModules): every GraphModule's ``conv -> bn`` pairs, and each
    MGIC block's ``N_j`` into its ``P_j``. A model with no GraphModule in it
    (the original network, for a fair comparison) is traced first, with the
    compiler's tracer, so ``out += identity`` stays in place; a model that cannot
    be traced raises :class:`~mgic_transform.MGICError` with the tracer's hint.
    The copy is for inference only: the folded network has no BatchNorm
    statistics left to train. ``model`` is not modified.
    """
    out = copy.deepcopy(model).eval()
    if not any(isinstance(m, torch.fx.GraphModule) for m in out.modules()):
        out = trace(out).eval()
    for module in list(out.modules()):
        if isinstance(module, MGICBlock):
            for j, (p, n) in enumerate(zip(module.prolong, module.norms)):
                if absorbs_batchnorm(p) and is_foldable_batchnorm(n) and n.running_mean is not None:
                    module.prolong[j] = fuse_conv_bn_eval(p, n)
                    module.norms[j] = nn.Identity()
        elif isinstance(module, torch.fx.GraphModule):
            _fold_graph(module)
    return out
