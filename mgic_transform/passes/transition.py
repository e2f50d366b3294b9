"""Transition blocks under the paper rule: the connector takes over the projection shortcut; the head stays.

A width- or stride-changing ("transition") block is rewritten as the paper's
lightweight connector (``c_in -> c_out``, with the block's stride) followed by
an MGIC block at ``c_out`` (Sec. 3.3, "Changing the channel resolution blocks").
Under ``rule="paper"`` three structural rules follow from that, all read off
the graph alone (``rule="compact"`` keeps version 0.1's transitions):

* **The projection shortcut becomes the identity.** A residual transition
  usually carries a projection on its skip path (ResNet's ``downsample``: a 1x1
  conv and a norm, maybe a pooling) whose only job is the width/stride change.
  Inside the levels, after the connector, that change has already happened, so
  the authors' code (``resnetMG.py``) has an identity shortcut there. Keeping
  the projection would add a ``c_j x c_j`` 1x1 conv to every level (a ResNet-50
  at ``s_g=32`` would lose its layer1 transition to "not smaller").
  :func:`drop_projection_shortcut` rewires such a branch to the block input.
* **The head keeps its width.** A transition whose output is the model's
  output (a classifier, a segmentation head) maps features to the task's
  classes; those channels are not a feature hierarchy, and the paper keeps the
  classifier dense. :func:`is_head` finds it.
* **Blocks, not layers.** The paper rewrites width-changing *blocks* (a
  bottleneck, an inverted residual); a single width-changing layer (a stem
  conv, MobileNetV3's 160 -> 960 expansion before the pool) stays a plain layer
  in its networks (Tables 4 and 6). The rewrite pass declines a transition with
  one channel-mixing layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from ..layers import is_channel_norm, is_pooling, is_projection
from ..ops import is_add, is_reshape

__all__ = ["drop_projection_shortcut", "is_head"]

def _projection_branch(block: torch.fx.GraphModule, arg: torch.fx.Node, x: torch.fx.Node
                       ) -> Optional[list[torch.fx.Node]]:
    """The chain ``x -> ... -> arg`` if it is a projection: one pointwise conv/linear, norms, poolings."""
    chain, node = [], arg
    while node is not x:
        if node.op != "call_module" or len(node.users) != 1 or len(node.all_input_nodes) != 1:
            return None
        mod = block.get_submodule(str(node.target))
        if not (is_projection(mod) or is_channel_norm(mod) or is_pooling(mod)):
            return None
        chain.append(node)
        node = node.all_input_nodes[0]
    mixing = [n for n in chain if is_projection(block.get_submodule(str(n.target)))]
    return chain if len(mixing) == 1 else None


def drop_projection_shortcut(block: torch.fx.GraphModule) -> bool:
    """Rewire a projection shortcut (``x -> 1x1 conv -> norm -> add``) of an extracted block to ``x``.

    ``block`` is a standalone block graph (``variants.extract_block``) with one
    placeholder. Returns whether a branch was dropped; the graph is linted and
    recompiled. A block with no such branch (a plain chain, an inverted residual
    without skip) is left as it is.
    """
    x = next(n for n in block.graph.nodes if n.op == "placeholder")
    for join in block.graph.nodes:
        if not is_add(join):
            continue
        for arg in join.all_input_nodes:
            chain = _projection_branch(block, arg, x)
            if chain:
                join.replace_input_with(arg, x)
                for n in chain:  # last to first: each has no user left once its reader is gone
                    block.graph.erase_node(n)
                block.graph.lint()
                block.delete_all_unused_submodules()
                block.recompile()
                return True
    return False


def is_head(exit: torch.fx.Node) -> bool:
    """Whether ``exit``'s value is the model's output, up to weightless reshapes (``flatten``, ``view`` ...)."""
    frontier = [exit]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.op == "output":
                return True
            if is_reshape(user):
                frontier.append(user)
    return False
