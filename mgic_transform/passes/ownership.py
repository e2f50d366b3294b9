"""Which MGIC blocks may reuse their input's memory at inference.

An MGIC block computes ``x_0 + N_0(P_0(.))`` as the input of its finest level.
Written into a new tensor, that is one full-width map more than the original
block holds (whose finest "level" reads the input itself), and it sets the
inference peak of the whole network (ResNet-50 layer1, batch 8: 98 MiB against
80 MiB). When nothing else will read the input, the block can add the correction
into it instead. That is decided here, from the graph, and written on the
``call_module`` node as ``overwrite_input=unobserved(...)``; :class:`~mgic_transform.MGICBlock`
uses it only without autograd, and a block called directly never overwrites.

The input may be overwritten when

* the block is its only user (nothing runs on it after the block), and
* its tensor is *fresh*: allocated by the node that produced it (a layer or an
  out-of-place arithmetic op), or written in place (``+=``, ``ReLU(inplace=True)``)
  into a fresh tensor that nothing else reads. Placeholders, constants, views and
  anything not on these lists may alias memory someone else holds, so they are
  never overwritten.

and, checked at every call (hooks can be added at any time), nobody can see the
tensor: the mark is not a constant but the value of
``unobserved(<the layers on the chain that produced the input>)``
(:func:`~mgic_transform.nn.mgic_block.unobserved`), false while autograd is on,
while a global hook or a dispatch mode is active, or while any of those layers
(or a layer inside them) has a forward hook or pre-hook. A hook that keeps a
layer's output (feature extraction) therefore sees the value the layer computed,
never one a later block wrote into it. The block checks its own hooks itself.
In the printed code this reads::

    unobserved = mgic_transform_nn_mgic_block_unobserved(layer1_0_relu)   # get_attr of the layer
    layer1_1 = getattr(self.layer1, "1")(layer1_0_relu_1, overwrite_input = unobserved)
"""

from __future__ import annotations


import torch
import torch.fx
from torch import nn

from ..layers import allocates, returns_input_in_place
from ..ops import allocates_result
from ..nn.mgic_block import MGICBlock, unobserved
from ..tracing import writes_in_place

__all__ = ["mark_overwritable_inputs", "is_fresh"]

def _writes_into_first_argument(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool | None:
    """``True``: the op returns its first argument, written in place; ``False``: it allocates; ``None``: unknown."""
    if writes_in_place(node, modules):
        # only ops known to *return* the tensor they wrote (an in-place layer of another kind may not)
        if node.op != "call_module" or returns_input_in_place(modules.get(str(node.target))):
            return True
        return None
    if node.op == "call_module":
        return False if allocates(modules.get(str(node.target))) else None
    return False if allocates_result(node) else None  # placeholder, get_attr: memory someone else holds


def is_fresh(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Is ``node``'s tensor memory that no other node or caller holds?

    Follows chains of in-place ops (``relu_(x += y)``) back to the op that
    allocated; every tensor on the chain must have the next op as its only user.
    """
    return _fresh_chain(node, modules) is not None


def _fresh_chain(node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[torch.fx.Node] | None:
    """The nodes from ``node`` back to the op that allocated its tensor, or ``None`` if it is not fresh."""
    chain = [node]
    while True:
        writes = _writes_into_first_argument(node, modules)
        if writes is None:
            return None
        if not writes:
            return chain
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or len(source.users) != 1:
            return None
        node = source
        chain.append(node)


def mark_overwritable_inputs(gm: torch.fx.GraphModule) -> int:
    """Mark every MGIC block call whose input is fresh and read by it alone; unmark every other.

    ``mgicify`` calls it on its result. Call it again (then ``gm.recompile()``)
    on a graph you edited so that it reads a block's input after the block
    (say, also returns the tensor between two MGIC blocks): a mark made before
    the edit would let the second block overwrite that tensor at inference.
    (``torchvision.models.feature_extraction`` traces through the blocks, so its
    graphs carry no marks and need nothing.)
    Returns the number of calls marked.
    """
    modules = dict(gm.named_modules())
    marked = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), MGICBlock):
            continue
        x = node.args[0] if node.args else None
        old = node.kwargs.get("overwrite_input")
        kwargs = {k: v for k, v in node.kwargs.items() if k != "overwrite_input"}
        chain = _fresh_chain(x, modules) if isinstance(x, torch.fx.Node) and len(x.users) == 1 else None
        if chain is not None:
            kwargs["overwrite_input"] = _guard(gm, node, [str(n.target) for n in chain if n.op == "call_module"])
            marked += 1
        node.kwargs = kwargs
        _erase_guard(gm, old)
    return marked


def _guard(gm: torch.fx.GraphModule, block: torch.fx.Node, layers: list[str]) -> torch.fx.Node:
    """Insert ``unobserved(<layers>)`` before ``block``: whether the block may overwrite its input at this call."""
    with gm.graph.inserting_before(block):
        args = tuple(gm.graph.get_attr(target) for target in dict.fromkeys(layers))
        return gm.graph.call_function(unobserved, args)


def _erase_guard(gm: torch.fx.GraphModule, old: object) -> None:
    """Remove a guard :func:`_guard` made (and the layer references only it read), once nothing uses it."""
    if not (isinstance(old, torch.fx.Node) and old.op == "call_function" and old.target is unobserved) or old.users:
        return
    refs = old.all_input_nodes
    gm.graph.erase_node(old)
    for ref in refs:
        if not ref.users:
            gm.graph.erase_node(ref)
