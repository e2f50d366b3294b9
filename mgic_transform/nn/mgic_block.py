"""The multigrid-in-channels block of the paper (Algorithm 1), for any CNN block.

For a block of width ``c`` the MGIC block holds a hierarchy of widths
``c = c_0 > c_1 > ... > c_L`` (halving until ``c_L <= s_c``) and runs::

    x_0 = x
    for j in 0 .. L-1:          x_{j+1} = R_j x_j                  # restrict (kept)
    y = block_L(x_L)                                               # ungrouped, narrow
    for j in L-1 .. 0:
        y = x_j + N_j(P_j(y - x_{j+1}))                            # coarse-grid correction
        y = block_j(y)                                             # grouped, s_g channels/group
    return y

``x_{j+1}`` *is* ``R_j x_j`` from the way down, so the correction reuses it
instead of recomputing the restriction. :func:`reference_forward` is exactly
this loop, out of place; :meth:`MGICBlock.forward` computes the same with less
memory (and is tested against it). Coarse maps are dropped as soon as the
way up has used them (the paper's inference-memory argument), and without
autograd the residual and the correction are computed in place in tensors the
block owns, and in its input only where the caller passes ``overwrite_input=True``
(the transformed graph does where nothing else reads that tensor). If every
``block_j`` is the identity, so is the MGIC block: ``y - x_{j+1}`` is zero,
``P_j`` has no bias and ``N_j`` starts with zero shift.

A width-changing ("transition") block additionally owns ``connector``, the
paper's lightweight depthwise 3x3 convolution from ``c_in`` to ``c_out`` (with
the block's stride), applied first.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from torch.nn.modules import module as _m
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .checkpointing import checkpoint_wanted, run_checkpointed

__all__ = ["MGICBlock", "reference_forward", "unobserved"]


def unobserved(*modules: nn.Module) -> bool:
    """Can nothing outside the computation see the tensors these modules take or return, at this call?

    True when autograd is off, no global forward (pre-)hook and no Python
    dispatch or torch-function mode is active, and neither the modules nor any
    of their submodules carries a forward hook or pre-hook. A hook on a layer
    may keep the tensor the layer returns (feature extraction does), so that
    tensor must not be written in place afterwards. Checked at every call, so
    hooks registered after the transform count (nothing is cached: a cache would
    miss a hooked layer swapped in later). The walk reads ``_modules`` directly:
    ``nn.Module.modules()`` builds a name for every submodule, 3x the cost.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        # torch.compile plans memory itself (probing modes would break its graph); a torch.jit.trace must
        # record ops that replay under any grad mode, which out= and in-place writes into inputs do not
        return False
    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _get_current_dispatch_mode() is not None \
            or torch._C._is_torch_function_mode_enabled():
        return False
    return not _any_forward_hook(modules)


def _any_forward_hook(modules: Sequence[nn.Module]) -> bool:
    """Whether any of ``modules`` or their submodules (at any depth) has a forward hook or pre-hook."""
    stack = list(modules)
    while stack:
        module = stack.pop()
        if module is None:  # a submodule slot registered as None
            continue
        if module._forward_hooks or module._forward_pre_hooks:
            return True
        stack.extend(module._modules.values())
    return False


def _writable(t: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``t -= other`` / ``t += other`` may overwrite ``t`` in place, saving an allocation.

    Only without autograd (``no_grad`` / ``inference_mode``), and only for a tensor
    the block itself produced that is not a parameter, would not be broadcast or
    type-promoted, and has no elements sharing memory (an ``expand`` view).
    """
    return (not torch.is_grad_enabled() and isinstance(t, torch.Tensor) and not t.requires_grad
            and t.shape == other.shape and t.dtype == other.dtype and _dense(t))


def _dense(t: torch.Tensor) -> bool:
    """Contiguous in some memory format, so no two elements share memory."""
    return (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))


def _residual(y: torch.Tensor, restricted: torch.Tensor, in_place: bool = True) -> torch.Tensor:
    """The coarse-grid residual ``y - R_j x_j``, written into ``y`` where :func:`_writable` allows.

    ``in_place=False`` (a hook could see ``y``: :func:`unobserved`) always allocates.
    """
    return y.sub_(restricted) if in_place and _writable(y, restricted) else y - restricted


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _normalized(norm: nn.Module, prolonged: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``N_j(P_j r)``; an eval-mode BatchNorm in place, as ``mul_`` and ``add_`` on the block's own ``P_j r``.

    In eval mode a BatchNorm is the per-channel affine map ``p * a + b`` with
    ``a = weight / sqrt(running_var + eps)`` and ``b = bias - running_mean * a``, which
    is also how PyTorch's CPU kernel computes it. Computed here per call (8 aten ops
    against the module's 10, and none of its Python), never cached: running statistics
    change without a version bump. In place it writes no new full-width map: at
    ``(8, 256, 40, 40)`` on one thread ``mul_`` + ``add_`` took 1.0 ms against 3.7 ms for
    ``addcmul(out=p)`` and several for the module, whose output is a fresh allocation. Only on the in-place path (no autograd, no hooks,
    :func:`unobserved`) and only for PyTorch's own ``BatchNorm{1,2,3}d`` with running
    statistics and affine parameters; anything else is called as the module it is.
    """
    if not (in_place and type(norm) in _BATCH_NORMS and not norm.training and norm.running_var is not None
            and norm.weight is not None and prolonged.dim() >= 2 and _writable(prolonged, prolonged)):
        return norm(prolonged)
    scale = torch.add(norm.running_var, _scalar(norm.eps, norm.running_var)).rsqrt_().mul_(norm.weight)
    shift = torch.addcmul(norm.bias, norm.running_mean, scale, value=-1)
    per_channel = (-1,) + (1,) * (prolonged.dim() - 2)
    return prolonged.mul_(scale.view(per_channel)).add_(shift.view(per_channel))


_SCALARS: dict[tuple, torch.Tensor] = {}


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device, made once per (value, dtype, device).

    ``tensor + 1e-5`` wraps the Python float into a tensor on every call (4 aten ops
    besides the add, as does a 0-dim tensor of another dtype); this one is added as it is.
    """
    key = (value, like.dtype, like.device)
    t = _SCALARS.get(key)
    if t is None:
        with torch.inference_mode(False), torch.no_grad():
            t = _SCALARS.setdefault(key, torch.tensor(value, dtype=like.dtype, device=like.device))
    return t


def _corrected(x: torch.Tensor, correction: torch.Tensor, may_overwrite_x: bool, in_place: bool = True) -> torch.Tensor:
    """The corrected fine maps ``x_j + N_j(P_j(.))``, written into ``x`` (if the caller allows) or ``correction``."""
    if in_place and may_overwrite_x and _writable(x, correction):
        return x.add_(correction)  # x_0 is dead once corrected: reuse its memory
    if in_place and _writable(correction, x):
        return correction.add_(x)
    return x + correction


class MGICBlock(nn.Module):
    """Multigrid-in-channels block (Eliasof et al., Algorithm 1).

    Args:
        levels: the block re-instantiated at every width, finest first; ``levels[-1]``
            is the ungrouped coarsest block, the others are grouped.
        restrict: ``R_j`` for ``j = 0 .. L-1`` (``c_j -> c_{j+1}``).
        prolong: ``P_j`` for ``j = 0 .. L-1`` (``c_{j+1} -> c_j``).
        norms: ``N_j`` for ``j = 0 .. L-1`` (normalisation of the prolonged residual).
        connector: optional width/stride-changing layer applied before the hierarchy.
        coarsest_mutates_input: whether ``levels[-1]`` writes into its input in place
            (``x += f(x)`` in the block's code). The input is then a copy, because
            ``x_L = R x`` is needed again for the coarse-grid residual ``y - x_L``.
        checkpoint: while autograd records, keep only the block's input and recompute its
            activations in the backward pass (``nn/checkpointing.py``); settable per block
            (``block.checkpoint = True``), and for every block by ``mgicify(..., checkpoint=True)``.
    """

    def __init__(
        self,
        levels: Sequence[nn.Module],
        restrict: Sequence[nn.Module],
        prolong: Sequence[nn.Module],
        norms: Sequence[nn.Module],
        connector: Optional[nn.Module] = None,
        *,
        coarsest_mutates_input: bool = False,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not (len(levels) == len(restrict) + 1 == len(prolong) + 1 == len(norms) + 1):
            raise ValueError(
                f"an MGIC block with {len(levels)} levels needs {len(levels) - 1} restrictions, prolongations "
                f"and norms; got {len(restrict)}, {len(prolong)}, {len(norms)}"
            )
        self.connector = connector
        self.levels = nn.ModuleList(levels)
        self.restrict = nn.ModuleList(restrict)
        self.prolong = nn.ModuleList(prolong)
        self.norms = nn.ModuleList(norms)
        self.coarsest_mutates_input = coarsest_mutates_input
        self.checkpoint = checkpoint

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def forward(self, x: torch.Tensor, *, overwrite_input: bool = False) -> torch.Tensor:
        """Algorithm 1 on ``x``.

        ``overwrite_input=True`` lets the block, when autograd is off, add the
        finest correction into ``x`` itself instead of a new tensor (one full-width
        map less at the inference peak). The transformed graph passes it where it
        has proved that nothing else reads ``x`` (``passes/ownership.py``); the
        default never writes into the caller's tensor.

        Nothing is written in place while autograd is on, or while a hook (on
        this block, any of its layers, or a global one) or a dispatch mode could
        keep one of the tensors (:func:`unobserved`, checked per call).
        """
        if getattr(self, "checkpoint", False) and checkpoint_wanted():  # getattr: blocks pickled before the flag
            return run_checkpointed(self, x, overwrite_input)
        in_place = unobserved(self)
        overwrite_input = overwrite_input and in_place
        if self.connector is not None:
            x = self.connector(x)
            overwrite_input = in_place  # the connector's output is the block's own
        xs = [x]
        for restrict in self.restrict:
            xs.append(restrict(xs[-1]))
        y = self.levels[-1](xs[-1].clone() if self.coarsest_mutates_input else xs[-1])
        for j in range(len(self.restrict) - 1, -1, -1):
            restricted = xs.pop()  # x_{j+1} = R_j x_j, kept from the way down
            residual = _residual(y, restricted, in_place)
            del y, restricted  # the coarse maps are dead: release them before the finer level runs
            prolonged = self.prolong[j](residual)
            del residual  # before N_j runs: at most two full-width maps besides x_j
            correction = _normalized(self.norms[j], prolonged, in_place)
            del prolonged
            y = _corrected(xs[-1], correction, may_overwrite_x=j == 0 and overwrite_input, in_place=in_place)
            del correction
            y = self.levels[j](y)
        return y

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"


def reference_forward(block: MGICBlock, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the paper, as written: the definition :meth:`MGICBlock.forward` must compute.

    Out of place and keeping every map; only for tests and benchmarks.
    """
    if block.connector is not None:
        x = block.connector(x)
    xs = [x]
    for restrict in block.restrict:  # down: x_{j+1} = R_j x_j
        xs.append(restrict(xs[-1]))
    # the coarsest, ungrouped block (on a copy if it writes into its input: R x is needed again below)
    y = block.levels[-1](xs[-1].clone() if block.coarsest_mutates_input else xs[-1])
    for j in reversed(range(len(block.restrict))):  # up: x_j + N_j(P_j(x_{j+1} - R_j x_j)), then block_j
        y = xs[j] + block.norms[j](block.prolong[j](y - xs[j + 1]))
        y = block.levels[j](y)
    return y
