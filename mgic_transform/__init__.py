"""mgic-transform: rewrite any PyTorch CNN into a multigrid-in-channels (MGIC) network.

>>> import torchvision, mgic_transform as mt
>>> gm = mt.mgicify(torchvision.models.resnet50(), group_size=32, coarsest_width=64)  # doctest: +SKIP
>>> print(mt.compare(torchvision.models.resnet50(), gm))                              # doctest: +SKIP
"""

from .api import mgicify
from .passes.calibrate import calibrate
from .deploy import export_pt2, load_pt2, optimize_for_inference
from .errors import MGICError
from .inference import fold_batchnorm
from .nn.mgic_block import MGICBlock
from .options import MGICOptions
from .plan import BlockDecision, BlockFit, MGICPlan, plan_of
from .report import Report, compare

__all__ = ["mgicify", "calibrate", "compare", "fold_batchnorm", "optimize_for_inference", "export_pt2", "load_pt2",
           "plan_of", "Report", "MGICBlock", "MGICError", "MGICOptions",
           "MGICPlan", "BlockDecision", "BlockFit"]
__version__ = "0.1.0"
