"""The op-knowledge table: what the compiler knows about the *functions and methods* in a traced graph.

:mod:`mgic_transform.layers` is the table for modules (``call_module`` nodes); this
is its sibling for ``call_function`` / ``call_method`` nodes. Every pass asks these
predicates, never a set of its own, so teaching the compiler an op is one line here.
Unknown ops are never assumed to be harmless: a predicate answers ``False`` (or
``None``: "unknown") for an op it does not list, and the pass then takes the safe path.

=======================  ===================================================================
question                 used by
=======================  ===================================================================
:func:`is_in_place_op`   tracing (dead-code elimination keeps it; state writes are found)
:func:`aliases_input`    tracing (a write through ``.data`` or a view is a write into state)
:func:`allocates_result` ownership (an MGIC block may overwrite a fresh tensor at inference)
:func:`is_add`           transition (the join of a projection shortcut)
:func:`is_reshape`       transition (the head: a transition whose output is the model's, up to reshapes)
:func:`is_concat`        blocks (a concatenation merges tensors of different widths)
:func:`takes_sizes`      variants (integer arguments that are channel widths, mapped per level)
=======================  ===================================================================
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["IN_PLACE_OPERATORS", "is_in_place_op", "aliases_input", "is_metadata_write", "allocates_result",
           "is_add", "is_reshape", "is_concat", "takes_sizes"]

#: ``x += y`` and friends, as the compiler's tracer records them (``operator.iadd`` ...).
IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})

# Ops whose result always shares memory with their first argument: an in-place write into the result is a write
# into the argument (``self.weight.data.clamp_()``, ``self.buf.view(-1).zero_()``, ``self.buf[0].add_(1)``).
# Ops that *may* copy (``reshape``, ``flatten``, ``contiguous``, ``to``) are not listed: an in-place op on a copy
# changes no state. A write they hide stays in the graph, where the rewrite sees the parameter used outside the block.
_ALIASING_METHODS = frozenset({"detach", "view", "view_as", "unflatten", "unsqueeze", "squeeze", "t", "transpose",
                               "permute", "expand", "expand_as", "narrow", "select", "as_strided", "unbind", "split",
                               "chunk", "diagonal", "movedim", "swapaxes", "swapdims", "moveaxis", "unfold"})
_ALIASING_FUNCTIONS = frozenset({torch.detach, torch.transpose, torch.select, torch.narrow, torch.unbind,
                                 torch.squeeze, torch.unsqueeze, torch.permute, torch.movedim, torch.moveaxis,
                                 torch.swapaxes, torch.swapdims, torch.t, torch.diagonal, torch.split, torch.chunk,
                                 torch.as_strided})
_ALIASING_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})
_METADATA_WRITES = frozenset({"requires_grad_"})  # in-place on metadata only

# Ops that return a tensor they allocated (never an input or a view of it).
_ALLOCATING_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.cat, torch.concat, torch.relu, torch.sigmoid, torch.tanh,
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish,
})
_ALLOCATING_METHODS = frozenset({"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "clone"})

_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
_ADD_METHODS = frozenset({"add", "add_"})
_RESHAPE_METHODS = frozenset({"flatten", "view", "reshape", "squeeze", "contiguous", "float", "to"})
_RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.squeeze, torch.reshape})
_CONCAT_FUNCTIONS = frozenset({torch.cat, torch.concat, torch.concatenate})

# Ops whose integer arguments are sizes: a channel width baked into the graph at trace time (LayerNorm2d's
# normalized_shape, Res2Net's split size, a layer-scale view) is mapped to the level's width like the layers.
_SIZED_FUNCTIONS = frozenset({torch.split, torch.reshape, F.layer_norm, torch.layer_norm, F.group_norm,
                              torch.unflatten})
_SIZED_METHODS = frozenset({"view", "reshape", "split", "split_with_sizes", "expand", "unflatten", "new_zeros",
                            "new_ones"})


@functools.lru_cache(maxsize=None)
def _inplace_position(fn: Any) -> Optional[int]:
    """Position of an ``inplace`` parameter of ``fn`` (``F.relu(x, True)``), if it has one."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def is_in_place_op(node: torch.fx.Node) -> bool:
    """Does a function or method node write into its first argument (``x += y``, ``x.relu_()``, ``F.relu(x, True)``)?"""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in IN_PLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        pos = _inplace_position(node.target)
        return pos is not None and len(node.args) > pos and node.args[pos] is True
    return False


def is_metadata_write(node: torch.fx.Node) -> bool:
    """An in-place op that changes only metadata (``requires_grad_``), not data."""
    return node.target in _METADATA_WRITES


def _basic_index(index: Any) -> bool:
    """Whether ``t[index]`` is a view: ints, slices, ``None`` and ``...`` only (a tensor or list index copies)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


def aliases_input(node: torch.fx.Node) -> bool:
    """Does ``node``'s value always share memory with its first argument (a view, ``.data``, basic indexing)?"""
    if node.op == "call_method":
        return node.target in _ALIASING_METHODS
    if node.op != "call_function" or not node.args:
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _ALIASING_ATTRIBUTES
    if node.target is operator.getitem:
        return len(node.args) > 1 and _basic_index(node.args[1])
    return node.target in _ALIASING_FUNCTIONS


def allocates_result(node: torch.fx.Node) -> Optional[bool]:
    """``True``: a function/method node returns a tensor it allocated; ``None``: unknown (may alias an input)."""
    if node.op == "call_function":
        return True if node.target in _ALLOCATING_FUNCTIONS else None
    if node.op == "call_method":
        return True if node.target in _ALLOCATING_METHODS else None
    return None


def is_add(node: torch.fx.Node) -> bool:
    """``a + b``, ``a += b``, ``torch.add``, ``a.add(b)``, ``a.add_(b)``."""
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)


def is_reshape(node: torch.fx.Node) -> bool:
    """A weightless op that only reshapes or converts its input (``flatten``, ``view``, ``squeeze``, ``.to``)."""
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)


def is_concat(node: torch.fx.Node) -> bool:
    """``torch.cat`` and its aliases."""
    return node.op == "call_function" and node.target in _CONCAT_FUNCTIONS


def takes_sizes(op: str, target: Any) -> bool:
    """Are the integer arguments of this ``call_function`` / ``call_method`` target sizes (``view(320, 1, 1)``)?"""
    return target in (_SIZED_FUNCTIONS if op == "call_function" else _SIZED_METHODS)
