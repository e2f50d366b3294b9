"""The runtime modules of an MGIC network: the block and its transfer operators.

This is all a saved transformed model needs to load and run; it imports nothing
from the compile-time passes (:mod:`mgic_transform.passes`).
"""

from .mgic_block import MGICBlock
from .transfer import ChannelBatchNorm, GroupedLinear, make_transfer

__all__ = ["MGICBlock", "ChannelBatchNorm", "GroupedLinear", "make_transfer"]
