"""Copying module structure without copying weights."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["copy_structure"]


def copy_structure(module: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> nn.Module:
    """Deep-copy ``module``'s object tree while mapping every parameter and buffer through ``convert``.

    With the default ``convert`` the copy *shares* its tensors with ``module``:
    the tree (modules, flags, attributes) is private, the weights are not, so it
    costs almost nothing. ``convert=lambda t: t.to("meta")`` gives a storage-less
    shadow for shape analysis.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in memo:
            new = convert(t)
            if isinstance(t, nn.Parameter) and not isinstance(new, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            memo[id(t)] = new
    return copy.deepcopy(module, memo)
