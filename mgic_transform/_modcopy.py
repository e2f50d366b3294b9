"""Copying module structure without copying weights.

``copy.deepcopy`` of a large model copies every weight and walks every
attribute through the generic pickle protocol; the compiler only ever needs a
*private object tree* whose tensors are shared (the input model must stay
untouched while the result is assembled), mapped to the meta device (shape
analysis), or replaced (new layers). :func:`copy_structure` does that in one
pass over ``nn.Module`` objects, several times faster than ``deepcopy``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx
from torch import nn

__all__ = ["copy_structure", "own_tensors", "fetch_attr", "meta_copy"]


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


_CONTAINERS = (list, set)


def copy_structure(module: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                   *, hooks: bool = True) -> nn.Module:
    """Copy ``module``'s tree of modules, mapping every parameter and buffer through ``convert``.

    Every module object is new (flags, hooks dicts, registries, and the lists,
    dicts and sets it holds are private: a forward that appends to ``self.feats``
    appends to the copy's list); other attributes are shared with the original
    (they are treated as read-only). With the default ``convert`` the copy *shares* its tensors with
    ``module``; ``convert=lambda t: t.to("meta")`` gives a storage-less shadow.
    Modules and tensors shared inside ``module`` stay shared in the copy.
    With ``hooks=False`` the copy carries no user hooks (analysis shadows and
    new layers must not run or inherit them).
    """
    tensors: dict[int, Any] = {}
    modules: dict[int, nn.Module] = {}

    def tensor(t: Any) -> Any:
        if t is None:
            return None
        if id(t) not in tensors:
            new = convert(t)
            if isinstance(t, nn.Parameter) and not isinstance(new, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            tensors[id(t)] = new
        return tensors[id(t)]

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in modules:
            return modules[id(m)]
        new = object.__new__(type(m))  # not type(m).__new__: GraphModule.__new__ makes a new class
        new.__dict__ = {k: (v.copy() if type(v) in _CONTAINERS or isinstance(v, dict) else v)
                        for k, v in m.__dict__.items()}
        if not hooks:
            for name in _HOOKS:
                if name in new.__dict__:
                    new.__dict__[name] = type(m.__dict__[name])()
        modules[id(m)] = new
        new.__dict__["_parameters"] = {k: tensor(v) for k, v in m._parameters.items()}
        new.__dict__["_buffers"] = {k: tensor(v) for k, v in m._buffers.items()}
        new.__dict__["_modules"] = {k: (clone(v) if v is not None else None) for k, v in m._modules.items()}
        return new

    return clone(module)


def own_tensors(module: nn.Module, keep: Callable[[nn.Module], bool] = lambda m: False) -> None:
    """Give ``module`` private copies of its tensors, in place (sharing inside ``module`` is kept).

    Submodules for which ``keep`` is true (and everything below them) are left as they are.
    """
    memo: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            copy = t.detach().clone()
            memo[id(t)] = nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else copy
        return memo[id(t)]

    stack = [module]
    while stack:
        m = stack.pop()
        if keep(m):
            continue
        for registry in (m._parameters, m._buffers):
            for k, v in registry.items():
                if v is not None:
                    registry[k] = own(v)
        for k, v in list(m.__dict__.items()):
            if isinstance(v, torch.Tensor):
                m.__dict__[k] = own(v)
        stack.extend(c for c in m._modules.values() if c is not None)


def fetch_attr(module: nn.Module, target: str) -> Any:
    """The object at a dotted attribute path (a submodule, parameter, buffer or tensor constant)."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters, buffers and tensor constants live on the meta device."""
    shadow = copy_structure(module, lambda t: t.detach().to("meta"), hooks=False)
    if isinstance(shadow, torch.fx.GraphModule):  # plain tensor constants referenced by get_attr
        for node in shadow.graph.nodes:
            if node.op == "get_attr":
                *parent, name = str(node.target).split(".")
                owner = shadow.get_submodule(".".join(parent))
                value = getattr(owner, name, None)
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.device.type != "meta":
                    setattr(owner, name, value.to("meta"))
    return shadow
