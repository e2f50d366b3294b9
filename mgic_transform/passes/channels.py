"""Which tensor dimension holds the channels, and which layers mix them.

A small table of per-layer rules (in the spirit of fvcore's per-op handlers):
each known layer type says along which dimension of its input it reads channels
and whether it couples channels with each other. The block finder uses
:func:`is_channel_mixing` to decide whether a region is worth rewriting and
:func:`block_channel_dim` to tell NCHW blocks from channels-last ones.
Unknown layers are never guessed: they get ``None`` and a block that needs
them is reported as unsupported.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.fx
from torch import nn

from .shapes import shape_of

__all__ = ["layer_channel_dim", "is_channel_mixing", "block_channel_dim", "CONV_TYPES", "NORM_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def layer_channel_dim(module: nn.Module, input_shape: Optional[Sequence[int]] = None) -> Optional[int]:
    """The input dimension a layer treats as channels: 1 (NC...), -1 (channels-last), or ``None``.

    A LayerNorm over one dimension normalises the last one, unless its input
    shows otherwise (a ``LayerNorm2d`` subclass normalising dim 1 of NCHW).
    """
    if isinstance(module, CONV_TYPES) or isinstance(module, NORM_TYPES):
        return 1
    if isinstance(module, nn.PReLU):
        return 1 if module.num_parameters > 1 else None
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        c = module.normalized_shape[0]
        if input_shape is not None and len(input_shape) > 2 and input_shape[-1] != c and input_shape[1] == c:
            return 1
        return -1
    return None


def is_channel_mixing(module: nn.Module) -> bool:
    """True for layers that couple different channels (dense or grouped conv, linear).

    Depthwise convolutions filter each channel on its own and do not count.
    """
    if isinstance(module, CONV_TYPES):
        return module.groups < module.in_channels
    return isinstance(module, nn.Linear)


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
    for node in interior:
        if node.op != "call_module":
            continue
        src = shape_of(node.args[0]) if node.args else None
        dim = layer_channel_dim(modules[node.target], src)
        if dim is None:
            continue
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
