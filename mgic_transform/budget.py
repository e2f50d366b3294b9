"""Compression to a budget: choose ``group_size`` and ``coarsest_width`` for a target size.

``mgicify(model, x, target_params=0.3)`` (or ``target_flops=0.5``) asks for the
largest MGIC network whose parameters (or FLOPs) are at most that fraction of
the original's. Both grow with the group size ``s_g`` (fewer, larger groups)
and with the coarsest width ``s_c`` (a larger dense level), so the search
walks powers of two:

* ``s_g`` over ``2, 4, 8, ...`` up to the model's widest layer, by bisection
  (each step is one full transform, measured exactly, never estimated);
* ``s_c`` tied to it as ``s_c = s_g`` and ``s_c = 2 s_g``, the two pairings the
  paper uses (``s_c = s_g`` in its Sec. 3.2 configuration, ``s_c = 64`` with
  ``s_g = 32`` in Table 5).

Every candidate the search measured is exact, so the answer is never over the
target; because ``transitions`` and "not smaller" declines make the size only
*nearly* monotone in ``s_g``, a better configuration between two measured ones
can in principle be missed. FLOPs are multiply-adds of convolutions, linear
layers and matrix products at the example input (``torch.utils.flop_counter``
on meta tensors: no memory, no compute), the ops that carry the cost; fvcore's
count in :func:`mgic_transform.compare` adds elementwise ops and can differ by
a few percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError, MGICError
from .passes.shapes import meta_copy
from .report import count_params

__all__ = ["count_macs", "search_budget", "Candidate"]


def count_macs(model: nn.Module, inputs: Sequence[Any]) -> int:
    """Multiply-adds of one forward pass of ``model`` at ``inputs``, counted on meta tensors.

    Convolutions, linear layers and matrix products (``torch.utils.flop_counter``,
    whose FLOP is two multiply-adds' worth, halved here to the paper's convention).
    Runs a storage-less copy in eval mode, so ``model`` is not touched.
    """
    shadow = meta_copy(model).eval()
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        shadow(*meta)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class Candidate:
    """One measured configuration."""

    group_size: int
    coarsest_width: int
    ratio: float  # transformed / original, for the metric searched
    gm: Optional[torch.fx.GraphModule] = None


def _powers_of_two(upto: int) -> list[int]:
    out, v = [], 2
    while v <= max(2, upto):
        out.append(v)
        v *= 2
    return out


def _widest(model: nn.Module) -> int:
    widths = [getattr(m, a) for m in model.modules() for a in ("out_channels", "out_features", "in_channels",
                                                             "in_features") if isinstance(getattr(m, a, None), int)]
    return max(widths, default=2)


def search_budget(model: nn.Module, inputs: Sequence[Any], *, metric: str, target: float,
                  transform: Callable[[int, int], torch.fx.GraphModule]) -> tuple[torch.fx.GraphModule, Candidate, int]:
    """The largest transform of ``model`` whose ``metric`` ratio is at most ``target``.

    ``transform(group_size, coarsest_width)`` runs ``mgicify`` with the user's
    other options. Returns the chosen network, its candidate, and how many
    candidates were measured. Raises :class:`MGICError` naming the smallest
    ratio reached when no candidate fits.
    """
    if metric == "params":
        original = count_params(model)
        measure = lambda gm: count_params(gm) / original
    elif metric == "flops":
        original = count_macs(model, inputs)
        if original == 0:
            raise ConfigError("target_flops needs a model with convolutions, linear layers or matrix products to "
                              "count. Hint: use target_params.")
        measure = lambda gm: count_macs(gm, inputs) / original
    else:  # pragma: no cover - the API checks this
        raise ValueError(metric)
    sizes = _powers_of_two(_widest(model))
    seen: dict[tuple[int, int], Candidate] = {}

    def evaluate(s_g: int, s_c: int) -> Candidate:
        if (s_g, s_c) not in seen:
            gm = transform(s_g, s_c)
            seen[(s_g, s_c)] = Candidate(s_g, s_c, measure(gm), gm)
        return seen[(s_g, s_c)]

    best: Optional[Candidate] = None
    for factor in (1, 2):
        lo, hi = 0, len(sizes) - 1  # bisection for the largest s_g that fits, s_c = factor * s_g
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = evaluate(sizes[mid], factor * sizes[mid])
            if cand.ratio <= target:
                if best is None or cand.ratio > best.ratio:
                    best = cand
                lo = mid + 1
            else:
                hi = mid - 1
    if best is None:
        evaluate(sizes[0], sizes[0])  # the smallest sizes, in case the bisection never reached them
        smallest = min(seen.values(), key=lambda c: c.ratio)
        raise MGICError(
            f"target_{metric}={target:g} cannot be met: the smallest MGIC network found has {smallest.ratio:.3f} of "
            f"the original's {metric} (group_size={smallest.group_size}, coarsest_width={smallest.coarsest_width}). "
            f"Hint: ask for target_{metric}>={smallest.ratio:.3f}, pass transitions=True to rewrite width-changing "
            f"blocks too, or use rule=\"compact\" for smaller networks.")
    return best.gm, best, len(seen)
