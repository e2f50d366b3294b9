"""Modules that make up an MGIC network: the block, its transfer operators and block variants."""

from .mgic_block import MGICBlock
from .transfer import ChannelBatchNorm, GroupedLinear, make_transfer

__all__ = ["MGICBlock", "ChannelBatchNorm", "GroupedLinear", "make_transfer"]
