"""Counting parameters and FLOPs: the one place the report and the budget search both read.

``compare()`` shows these figures and ``target_params`` / ``target_flops`` are met by
them, so the target holds by the figure the user sees.

* **Parameters** are the scalar entries of ``model.parameters()`` (shared tensors counted
  once; buffers such as BatchNorm statistics are not parameters).
* **FLOPs** are fvcore's ``FlopCountAnalysis`` of one forward pass at the example input,
  **one multiply-add = one FLOP** (the MGIC paper's convention). Operators fvcore has no
  formula for are returned as ``uncounted``, never scored as zero in silence.
* :func:`count_macs` is the cheap estimate (``torch.utils.flop_counter`` on meta tensors: no
  memory, no compute; convolutions, linear layers and matrix products only); the budget
  search ranks candidates with it and checks its answer with :func:`count_flops`.

Counting never changes the models: it runs on a private copy of the module tree that
shares the weights but has its own buffers, attributes and flags and no hooks.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._modcopy import copy_structure, meta_copy
from .errors import first_line
from .inputs import as_input_tuple

__all__ = ["FLOP_CONVENTION", "FlopCount", "count_params", "count_params_of", "count_flops", "count_macs",
           "eval_mode", "outermost"]

FLOP_CONVENTION = "1 FLOP = 1 multiply-add (fvcore; the convention of the MGIC paper's tables)"

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def count_params(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``; a tensor shared by several layers counts once."""
    return sum(p.numel() for p in model.parameters())


def count_params_of(model: nn.Module, paths: Iterable[str]) -> int:
    """Parameters of the submodules at ``paths`` (shared tensors counted once).

    ``""`` is the model itself. Paths that do not exist in ``model`` count zero.
    """
    seen: dict[int, int] = {}
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def outermost(paths: Iterable[str]) -> tuple[str, ...]:
    """Drop every path that lies inside another one, so nothing is counted twice.

    >>> outermost(["a.b", "a", "c.d"])
    ('a', 'c.d')
    """
    paths = list(dict.fromkeys(paths))
    if "" in paths:
        return ("",)
    return tuple(p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p))


@dataclass(frozen=True)
class FlopCount:
    """fvcore's count for one model: the total, per module path, and the ops it could not count.

    ``total`` and ``by_module`` are ``None``/empty and ``error`` says why when fvcore
    could not trace the model.
    """

    total: Optional[int]
    by_module: Mapping[str, int]
    uncounted: Mapping[str, int]
    error: Optional[str] = None

    def of(self, paths: Iterable[str]) -> Optional[int]:
        """FLOPs of the modules at ``paths`` (``None`` when not counted or a path never ran)."""
        if self.total is None:
            return None
        flops = [self.by_module.get(p) for p in outermost(paths)]
        return None if any(f is None for f in flops) else sum(flops)


def count_flops(model: nn.Module, inputs: ExampleInputs) -> FlopCount:
    """Count FLOPs of one forward pass of ``model`` with fvcore (1 multiply-add = 1 FLOP).

    A private copy of the model's module tree (weights shared, buffers and
    attributes its own, no hooks) runs in eval mode under ``torch.no_grad()``;
    ``model`` itself is not touched. fvcore's own log warnings about
    unsupported ops are switched off: the ops come back in ``uncounted`` instead.
    A model fvcore cannot trace (``torch.jit.trace``) gives ``total=None`` and the
    reason in ``error`` rather than an exception, so the parameter counts of a
    report survive a model with, say, dict inputs.
    """
    inputs = as_input_tuple(inputs, allow_empty=True)
    # fvcore registers scope hooks on every module (and leaves them there when tracing fails), and the
    # forward may update buffers or attributes: count on a private copy of the tree (weights shared)
    model = copy_structure(model, lambda t: t if isinstance(t, nn.Parameter) else t.clone(), hooks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore import and jit.trace emit deprecation/tracer warnings
        from fvcore.nn import FlopCountAnalysis

        with eval_mode(model), torch.no_grad():
            analysis = (
                FlopCountAnalysis(model, inputs)
                .set_op_handle("aten::matmul", _matmul_flops, "aten::bmm", _matmul_flops)  # bmm: also with out=
                .unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False)
            )
            try:
                total = int(analysis.total())
            except Exception as exc:  # noqa: BLE001 - any trace failure becomes a note in the report
                return FlopCount(None, {}, {}, error=f"{type(exc).__name__}: {first_line(exc)}")
            return FlopCount(
                total=total,
                by_module={k: int(v) for k, v in analysis.by_module().items()},
                uncounted=dict(analysis.unsupported_ops()),
            )


def _matmul_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of ``torch.matmul``, broadcasting included: every output element costs ``k``.

    fvcore's own formula multiplies the *first* operand's size by the last dimension,
    which misses a batch that only the second operand has (``W[G, o, i] @ x[N, G, i, P]``,
    the grouped 1x1 convolution of :class:`~mgic_transform.nn.transfer.PointwiseConv2d`).
    Also used for ``bmm``, whose fvcore formula rejects the ``out=`` form that
    ``PointwiseConv2d`` uses per image without autograd.
    """
    from fvcore.nn.jit_handles import get_shape

    k = get_shape(inputs[0])[-1]
    return math.prod(get_shape(outputs[0])) * k


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore each submodule's own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def count_macs(model: nn.Module, inputs: Sequence[Any]) -> int:
    """Multiply-adds of one forward pass of ``model`` at ``inputs``, counted on meta tensors.

    Convolutions, linear layers and matrix products (``torch.utils.flop_counter``,
    whose FLOP is two multiply-adds' worth, halved here to the paper's convention).
    Runs a storage-less copy in eval mode, so ``model`` is not touched. An estimate
    of :func:`count_flops` (which also counts norms and pooling), about 100x cheaper.
    """
    shadow = meta_copy(model).eval()
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        shadow(*meta)
    return counter.get_total_flops() // 2
