"""Which tensor dimension holds a block's channels.

Each layer type says along which dimension of its input it reads channels and
whether it couples channels with each other: the ``channel_dim`` and
``mixes_channels`` columns of the layer-rules table (:mod:`mgic_transform.layers`,
re-exported here as :func:`layer_channel_dim` and :func:`is_channel_mixing`).
The block finder uses :func:`is_channel_mixing` to decide whether a region is
worth rewriting and :func:`block_channel_dim` to tell NCHW blocks from
channels-last ones. Unknown layers are never guessed: they get ``None`` and a
block that needs them is reported as unsupported.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional

import torch.fx
from torch import nn

from ..layers import is_channel_mixing, layer_channel_dim
from .shapes import shape_of

__all__ = ["layer_channel_dim", "is_channel_mixing", "block_channel_dim", "channel_layers"]

def channel_layers(nodes: Iterable[torch.fx.Node], modules: Mapping[str, nn.Module]
                   ) -> Iterator[tuple[torch.fx.Node, Optional[torch.Size], int]]:
    """``(node, input shape, channel dim)`` for every layer among ``nodes`` whose channel dim is known."""
    for node in nodes:
        if node.op != "call_module":
            continue
        src = shape_of(node.args[0]) if node.args else None
        dim = layer_channel_dim(modules[node.target], src)
        if dim is not None:
            yield node, src, dim


def block_channel_dim(
    entry: torch.fx.Node, interior: list[torch.fx.Node], modules: dict[str, nn.Module]
) -> Optional[int]:
    """The channel dimension of a block's entry tensor, as a non-negative index.

    Read off the first layer with a channel rule: its input is the entry tensor
    itself, a tensor of the same shape, or one that differs from the entry only
    along the layer's channel dimension (a ``chunk``/``split`` of the channels,
    as in ShuffleNet units). ``None`` when no layer tells (the block is then
    reported as unsupported).
    """
    entry_shape = shape_of(entry)
    if entry_shape is None:
        return None
    for node, src, dim in channel_layers(interior, modules):
        if src is None or len(src) != len(entry_shape):
            return None
        dim %= len(entry_shape)
        # the same tensor up to the channel dim (a chunk of the channels), or the same
        # batch and channel count (a pooled / strided copy, as a U-Net's down path reads)
        if all(a == b for i, (a, b) in enumerate(zip(src, entry_shape)) if i != dim):
            return dim
        if src[0] == entry_shape[0] and src[dim] == entry_shape[dim] and dim != 0:
            return dim
        return None
    return None
