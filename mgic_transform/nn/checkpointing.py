"""Activation checkpointing of one MGIC block: training memory for compute.

Autograd keeps, for the backward pass, the activations of every level of every
MGIC block (widths ``c + c/2 + c/4 + ... ~ 2c``) plus the inputs of ``P_j`` and
``N_j``: an MGIC ResNet-50 holds ~2.3x the original's training memory. With
``mgicify(..., checkpoint=True)`` (or ``block.checkpoint = True`` on any single
block) a block keeps only its input; its activations are recomputed, one block
at a time, when the backward pass reaches it (PyTorch's non-reentrant
:func:`torch.utils.checkpoint.checkpoint`). The authors' code does the same with
``checkpoint_sequential``. Only when autograd records (``torch.is_grad_enabled()``):
under ``no_grad`` / ``inference_mode`` the block runs as usual, in place.

**State updated in forward.** The recomputation runs the block's forward a
second time, in the same mode. A training-mode BatchNorm would update its
running statistics (and ``num_batches_tracked``) twice per step, and the
network would train on different statistics than without checkpointing. The
recomputation therefore snapshots every buffer of the block before it starts
and restores them when it ends (also when PyTorch stops it early, once it has
recomputed what the backward needs). Outputs do not change: a training-mode
BatchNorm normalises with the batch's statistics, not the running ones, and the
random state is replayed (``preserve_rng_state``), so dropout masks are equal.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_wanted", "run_checkpointed"]

# True while a block's forward runs *inside* its own checkpoint (first pass or recomputation),
# so that the recursive call computes instead of checkpointing again.
_INSIDE = contextvars.ContextVar("mgic_inside_checkpoint", default=False)


def checkpoint_wanted() -> bool:
    """Whether a block with ``checkpoint=True`` should checkpoint this call (autograd on, not already inside)."""
    return torch.is_grad_enabled() and not _INSIDE.get()


class _BuffersRestored:
    """Undo whatever a recomputed forward writes into ``module``'s buffers (BatchNorm running statistics).

    Re-entrant: PyTorch enters the same recomputation context once per recomputation, and a block
    is recomputed as often as its graph is replayed (``backward(retain_graph=True)`` twice, a
    gradient penalty with ``create_graph=True``). Each entry snapshots afresh.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def __enter__(self) -> None:
        self.saved.append([(b, b.clone()) for b in self.module.buffers()])

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, value in self.saved.pop():
                buf.copy_(value)


def _inner(block: nn.Module, x: torch.Tensor, overwrite_input: bool) -> torch.Tensor:
    token = _INSIDE.set(True)
    try:
        return block.forward(x, overwrite_input=overwrite_input)
    finally:
        _INSIDE.reset(token)


def run_checkpointed(block: nn.Module, x: torch.Tensor, overwrite_input: bool = False) -> torch.Tensor:
    """``block.forward(x)`` under non-reentrant activation checkpointing, buffers kept as one forward leaves them."""
    return checkpoint(_inner, block, x, overwrite_input, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _BuffersRestored(block)))
