"""The compiler's passes, one per file, in the order ``api._transform`` runs them.

====  ===============  ==================================================================
step  pass             what it does
====  ===============  ==================================================================
1     ``shapes``       every node's shape, on meta tensors (fake tensors as fallback), at
                       the example size and at twice its spatial size
2     ``blocks``       the candidate blocks: single-entry single-exit regions of the
                       dataflow graph (fork..join units, single layers with their tail)
3     ``rewrite``      each candidate decided (rule, sizes, skip patterns, shared or frozen
                       weights) and, if rewritten, replaced by an ``MGICBlock`` call
4     ``inherit``      with ``init="inherit"`` / ``"calibrate"``: every level's weights as
                       Galerkin products of the trained block's
5     ``ownership``    which MGIC block calls may reuse their input's memory at inference
6     ``calibrate``    with ``init="calibrate"`` (after the transform, or as
                       ``mt.calibrate``): every block fitted to the trained network's output
====  ===============  ==================================================================

Helper files, not passes of their own: ``channels`` (which dimension holds a block's
channels; used by ``blocks`` and ``rewrite``), ``variants`` (a block re-instantiated at a
level's width; used by ``rewrite``), ``transition`` (the paper rule's structural rules
for width-changing blocks: the head, single layers, the projection shortcut; used by
``rewrite``).
"""
