"""Example inputs: checking the ones a user passes, and inferring one when none is given.

Shared by :func:`mgic_transform.mgicify` (which needs an input to propagate
shapes) and :func:`mgic_transform.compare` (which needs one to count FLOPs),
so that both accept the same values and make the same guess.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InputError
from .layers import example_input_shape

__all__ = ["as_input_tuple", "infer_example_inputs"]


def as_input_tuple(example_inputs: Any, *, allow_empty: bool = False) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors: one tensor, or a tuple/list of them.

    ``allow_empty`` accepts ``()`` (a model whose forward takes no tensor, as
    :func:`~mgic_transform.compare` may be handed back from ``mgicify``).
    Anything else raises :class:`~mgic_transform.errors.InputError` with a hint.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and (example_inputs or allow_empty) and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}. "
        f"Hint: pass e.g. torch.randn(1, 3, 224, 224), with the shape the model expects."
    )


def infer_example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A dummy batch for ``model``, read off its first layer that tells its input width.

    ``Conv2d(3, ...)`` gives ``1x3x224x224``, ``Conv1d(3, ...)`` ``1x3x1024``,
    ``Conv3d(3, ...)`` ``1x3x16x112x112`` and ``Linear(k, ...)`` ``1xk``
    (the ``example_input`` column of :mod:`mgic_transform.layers`).
    """
    for m in model.modules():
        shape = example_input_shape(m)
        if shape is not None:
            p = next(m.parameters())
            return (torch.zeros(shape, dtype=p.dtype, device=p.device),)
    raise InputError(
        f"cannot infer an example input for {type(model).__name__}: it has no Conv or Linear layer to read the "
        f"input width from. Hint: pass example_inputs=torch.randn(...) with the shape the model expects."
    )
