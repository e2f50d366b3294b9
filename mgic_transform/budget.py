"""Compression to a budget: choose the sizes, per block, for a target size.

``mgicify(model, x, target_params=0.3)`` (or ``target_flops=0.5``) asks for the
largest MGIC network whose parameters (or FLOPs) are at most that fraction of
the original's, counted exactly as :func:`mgic_transform.compare` counts them
(:mod:`mgic_transform.counting`), so the target holds by the figure the user sees.

The search runs in two steps.

1. **One size for every block.** Parameters and FLOPs grow with the group size
   ``s_g`` (fewer, larger groups) and with the coarsest width ``s_c``, so the
   search bisects ``s_g`` over powers of two, with ``s_c = s_g`` and ``s_c = 2 s_g``
   (the paper's two pairings), each step a full transform, measured. When the
   user did not say ``transitions`` and no candidate fits without rewriting the
   width-changing blocks, the candidates with ``transitions=True`` are tried too.
   The best candidate that fits is the starting point; powers of two can land
   well under the target (0.24 for 0.3).
2. **Sizes per block, to fill the budget.** Every candidate measured in step 1
   also says what each block costs at its sizes (the plan's per-block
   parameters; per-module multiply-adds for FLOPs), and a block's cost does not
   depend on how the others are sized, so the cost of any assignment is a sum:
   choosing one measured size per block within the target is a multiple-choice
   knapsack, solved exactly by dynamic programming (:func:`_knapsack`):

   - without calibration data, the fullest fill: the largest network that fits,
     with one size per *stage* (the blocks of one width) unless sizes per block
     fill the budget better;
   - with a ``sensitivity`` (calibration data: the output error each block would
     have at each size, :func:`mgic_transform.passes.calibrate.block_errors`),
     the least summed error, in the spirit of non-uniform allocation in one-shot
     pruning (OWL; the layer-wise budgets of SparseGPT's successors).

   The chosen sizes go into ``MGICOptions.block_sizes``; the network is built
   and measured exactly. If the sum was off (FLOPs are estimated on meta tensors
   during the search), the fill is redone against a target lowered (over the
   target) or raised (more than 3% under it) by the measured error.

Every answer is measured, never estimated, so it is never over the target.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._modcopy import meta_copy
from .counting import count_flops, count_params, outermost
from .errors import ConfigError, MGICError
from .options import MGICOptions
from .plan import Budget, Decline, MGICPlan, attach_plan, plan_of

__all__ = ["search_budget", "Candidate", "Sensitivity"]

Transform = Callable[[nn.Module, Sequence[Any], MGICOptions], torch.fx.GraphModule]
Sizes = tuple[int, int]
#: ``(block path, candidate options) -> relative output error``; larger means the block loses more.
Sensitivity = Callable[[str, torch.fx.GraphModule], float]


@dataclass
class Candidate:
    """One measured network: its options, its ratio, and what each rewritten block costs.

    ``ratio`` is exact for parameters and, for FLOPs, the cheap meta-tensor estimate
    (multiply-adds of conv/linear/matmul); ``exact`` is the report's figure, counted only
    for the candidates that may be the answer. ``blocks`` maps a block's path to ``(cost
    before, cost after)`` in the estimate's unit (a block left alone is absent: it costs
    what it did).
    """

    options: MGICOptions
    ratio: float
    gm: torch.fx.GraphModule
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)
    exact: Optional[float] = None

    @property
    def sizes(self) -> Sizes:
        return self.options.sizes


class _Meter:
    """Counts the metric searched: estimated (cheap), exactly (the report's count), and per block.

    For parameters the three agree. For FLOPs the estimate is the multiply-adds of
    conv/linear/matmul on meta tensors, and the exact count is fvcore's (norms and pooling
    too), which runs the network for real: the search ranks by the estimate, scaled by the
    ratio of the two measured on the candidates it verified, and verifies its answers.
    """

    def __init__(self, model: nn.Module, inputs: Sequence[Any], metric: str) -> None:
        self.model, self.inputs, self.metric = model, tuple(inputs), metric
        if metric == "params":
            self.original = count_params(model)
            self._module_macs: dict[str, int] = {}
            self._estimate_total = self.original
        else:
            self.original = self._fvcore(model)
            self._module_macs = _macs_by_module(model, self.inputs)
            self._estimate_total = self._module_macs.get("", 0)
        if self.original == 0 or self._estimate_total == 0:
            raise ConfigError(f"target_{metric} needs a model with {'parameters' if metric == 'params' else 'FLOPs'} "
                              f"to count. Hint: use target_params.")

    def _fvcore(self, model: nn.Module) -> int:
        total = count_flops(model, self.inputs).total
        if total is None:
            raise ConfigError("target_flops needs FLOPs fvcore can count, and fvcore cannot trace this model. "
                              "Hint: use target_params.")
        return total

    def exact(self, gm: torch.fx.GraphModule) -> float:
        """The ratio ``compare()`` reports."""
        return (count_params(gm) if self.metric == "params" else self._fvcore(gm)) / self.original

    def estimate(self, gm: torch.fx.GraphModule, plan: MGICPlan) -> tuple[float, dict[str, tuple[int, int]]]:
        """The estimated ratio, and ``path -> (cost before, cost after)`` of every rewritten block."""
        if self.metric == "params":
            return count_params(gm) / self.original, {d.path: (d.params_before, d.params_after) for d in plan.rewritten}
        macs = _macs_by_module(gm, self.inputs)
        blocks = {d.path: (sum(self._module_macs.get(p, 0) for p in outermost(d.layers)), macs.get(d.module, 0))
                  for d in plan.rewritten}
        return macs.get("", 0) / self._estimate_total, blocks

    def scale(self) -> float:
        """The per-block costs' unit, as a fraction of the original's estimated total."""
        return 1.0 / self._estimate_total


def _macs_by_module(model: nn.Module, inputs: Sequence[Any]) -> dict[str, int]:
    """Multiply-adds of every module path (``""``: the whole model), on meta tensors (no memory, no compute)."""
    shadow = meta_copy(model).eval()
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        shadow(*meta)
    out = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key.partition(".")[2]  # "<RootClass>.layer1.0" -> "layer1.0"
        out[path] = sum(ops.values()) // 2
    out[""] = counter.get_total_flops() // 2
    return out


# ----------------------------------------------------------------------------- step 1: one size for every block


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


class _Search:
    """Measures candidates, each once, with the warnings each transform raised kept for the one chosen."""

    def __init__(self, model: nn.Module, inputs: Sequence[Any], options: MGICOptions, transform: Transform) -> None:
        self.model, self.inputs, self.transform = model, tuple(inputs), transform
        self.metric, self.target = options.target
        self.base = options.replace(target_params=None, target_flops=None)
        self.meter = _Meter(model, inputs, self.metric)
        self.seen: dict[tuple, Candidate] = {}
        self.warnings: dict[int, list[warnings.WarningMessage]] = {}
        self.correction = 1.0  # exact / estimated ratio of the last candidate counted exactly

    def measure(self, options: MGICOptions) -> Candidate:
        key = (options.sizes, options.rewrites_transitions, options.block_sizes)
        if key not in self.seen:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gm = self.transform(self.model, self.inputs, options)
            plan = plan_of(gm)
            ratio, blocks = self.meter.estimate(gm, plan)
            cand = Candidate(plan.options, ratio, gm, blocks)
            self.warnings[id(cand)] = list(caught)
            self.seen[key] = cand
        return self.seen[key]

    def exact(self, cand: Candidate) -> float:
        """The report's ratio of ``cand`` (counted once); it updates the estimate's correction."""
        if cand.exact is None:
            cand.exact = cand.ratio if self.metric == "params" else self.meter.exact(cand.gm)
            self.correction = cand.exact / cand.ratio if cand.ratio else 1.0
        return cand.exact

    def fits(self, cand: Candidate) -> bool:
        """Whether ``cand`` is within the target, by the estimate scaled to the report's count."""
        return cand.ratio * self.correction <= self.target

    def verified(self, cands: Sequence[Candidate]) -> Optional[Candidate]:
        """The largest of ``cands`` whose exact ratio is within the target (the estimate may be off by a few %)."""
        for cand in sorted(cands, key=lambda c: c.ratio, reverse=True):
            if self.exact(cand) <= self.target:
                return cand
        return None

    def uniform(self, transitions: bool) -> Optional[Candidate]:
        """The largest one-size network that fits, by bisection over ``s_g`` (``s_c = s_g``, ``2 s_g``)."""
        sizes = _powers_of_two(_widest(self.model))
        fitting = []
        for factor in (1, 2):
            if factor == 2 and not fitting:
                break  # s_c = 2 s_g is the larger network of the same s_g: none of it fits either
            lo, hi = 0, len(sizes) - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                cand = self.measure(self.base.replace(group_size=sizes[mid], coarsest_width=factor * sizes[mid],
                                                      transitions=transitions))
                if self.metric == "flops" and cand.exact is None and len(self.seen) == 1:
                    self.exact(cand)  # the first candidate calibrates the estimate
                if self.fits(cand):
                    fitting.append(cand)
                    lo = mid + 1
                else:
                    hi = mid - 1
        same = [c for c in self.seen.values() if c.options.rewrites_transitions == transitions]
        best = self.verified(fitting) or self.verified([c for c in same if c.ratio < min(
            (f.ratio for f in fitting), default=float("inf"))])
        if best is not None:  # sizes around it (s_c up to 4 s_g), which the per-block step may give some blocks
            s_g = best.sizes[0]
            for g, c in ((2 * s_g, 2 * s_g), (2 * s_g, 4 * s_g), (4 * s_g, 4 * s_g), (s_g, 2 * s_g), (s_g, 4 * s_g),
                         (4 * s_g, 8 * s_g), (max(1, s_g // 2), s_g), (max(1, s_g // 2), 2 * s_g)):
                if g <= sizes[-1]:
                    self.measure(self.base.replace(group_size=g, coarsest_width=c, transitions=transitions))
        return best

    def replay_warnings(self, cand: Candidate) -> None:
        for w in self.warnings.get(id(cand), ()):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def unreachable(self) -> MGICError:
        smallest = min(self.seen.values(), key=lambda c: c.ratio)
        ratio = self.exact(smallest)
        opts, hints = self.base, [f"ask for target_{self.metric}>={ratio:.3f}"]
        if opts.transitions is False:
            hints.append("pass transitions=True to rewrite width-changing blocks too")
        if opts.rule != "compact":
            hints.append("use rule=\"compact\" for smaller networks")
        s_g, s_c = smallest.sizes
        return MGICError(
            f"target_{self.metric}={self.target:g} cannot be met: the smallest MGIC network found has "
            f"{ratio:.3f} of the original's {self.metric} (group_size={s_g}, coarsest_width={s_c}"
            f"{', transitions=True' if smallest.options.transitions else ''}). Hint: {', or '.join(hints)}.")


# ----------------------------------------------------------------------------- step 2: sizes per block


#: The knapsack's cost resolution, as a fraction of the original's total (exact answers are verified anyway).
_RESOLUTION = 1e-4
#: How close under the target an answer must land for the per-block step to stop refilling.
_CLOSE = 0.03


@dataclass
class _Allocation:
    """Which measured sizes every block gets, and what that costs in all (a fraction of the original).

    ``cost[p][id(c)]``: block ``p``'s cost at candidate ``c``'s sizes (the original block's where
    ``c`` left it alone), in the estimate's unit; ``total`` the whole network's.
    """

    choice: dict[str, Candidate]
    total: float
    cost: dict[str, dict[int, float]]

    @classmethod
    def start(cls, start: Candidate, options: Sequence[Candidate], paths: Sequence[str], unit: float) -> "_Allocation":
        before = {p: max((c.blocks[p][0] for c in options if p in c.blocks), default=0) for p in paths}
        cost = {p: {id(c): (c.blocks[p][1] if p in c.blocks else before[p]) * unit for c in options} for p in paths}
        return cls({p: start for p in paths}, start.ratio, cost)

    def item_cost(self, item: Sequence[str], cand: Candidate) -> float:
        return sum(self.cost[p][id(cand)] for p in item)


Value = Callable[[Sequence[str], Candidate], float]


def _knapsack(alloc: _Allocation, options: Sequence[Candidate], target: float, items: list[list[str]],
              value: Value) -> tuple[dict[str, Candidate], float]:
    """The sizes that maximise the summed ``value(item, candidate)`` within ``target``: ``(choice, total)``.

    A multiple-choice knapsack (every item takes exactly one candidate's sizes), solved exactly
    by dynamic programming over the cost in steps of :data:`_RESOLUTION`; costs are rounded up,
    so the answer's estimated total is within the target. Items are groups of blocks that take
    the same sizes (a stage, or one block).
    """
    fixed = alloc.total - sum(alloc.item_cost(item, alloc.choice[item[0]]) for item in items)
    capacity = int((target - fixed) / _RESOLUTION)
    if capacity < 0:
        return dict(alloc.choice), alloc.total
    steps = [[math.ceil(alloc.item_cost(item, cand) / _RESOLUTION - 1e-9) for cand in options] for item in items]
    best = np.full(capacity + 1, -np.inf)
    best[0] = 0.0
    picks = []
    for item, costs in zip(items, steps):
        new, pick = np.full(capacity + 1, -np.inf), np.full(capacity + 1, -1)
        for j, (cand, c) in enumerate(zip(options, costs)):
            if c > capacity:
                continue
            shifted = np.full(capacity + 1, -np.inf)
            shifted[c:] = best[:capacity + 1 - c] + value(item, cand)
            better = shifted > new
            new[better], pick[better] = shifted[better], j
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        return dict(alloc.choice), alloc.total
    top = best.max()
    at = int(np.flatnonzero(best >= top - 1e-12).max())  # ties: the fullest
    choice = dict(alloc.choice)
    for item, pick, costs in zip(reversed(items), reversed(picks), reversed(steps)):
        j = int(pick[at])
        for p in item:
            choice[p] = options[j]
        at -= costs[j]
    total = fixed + sum(alloc.item_cost(item, choice[item[0]]) for item in items)
    return choice, total


def _stages(paths: Sequence[str], widths: dict[str, int]) -> list[list[str]]:
    """Blocks grouped by width (a ResNet stage, a MobileNet stage), in model order."""
    groups: dict[int, list[str]] = {}
    for p in paths:
        groups.setdefault(widths.get(p, 0), []).append(p)
    return list(groups.values())


def _allocate(search: _Search, start: Candidate, sensitivity: Optional[Sensitivity], scale: float = 1.0
              ) -> dict[str, Candidate]:
    """Per-block sizes within the target: the fullest fill (by stage where that is as full), or least error.

    Without a sensitivity the knapsack maximises the cost itself (the largest network that
    fits); sizes per stage win over sizes per block unless those fill the budget better by more
    than the resolution. With one it minimises the summed block errors. The sums are estimates
    (exact for parameters): the target is scaled by the start's exact-to-estimated ratio, and
    the answer is verified exactly (:func:`_per_block`).
    """
    options = [c for c in search.seen.values()
               if c.options.rewrites_transitions == start.options.rewrites_transitions and not c.options.block_sizes]
    plan = plan_of(start.gm)
    paths = [d.path for d in plan.rewritten]
    alloc = _Allocation.start(start, options, paths, search.meter.scale())
    target = scale * search.target * start.ratio / search.exact(start)
    blocks = [[p] for p in paths]
    if sensitivity is None:
        fill = alloc.item_cost
        stage, stage_total = _knapsack(alloc, options, target, _stages(paths, {d.path: d.out_width
                                                                               for d in plan.rewritten}), fill)
        block, block_total = _knapsack(alloc, options, target, blocks, fill)
        return block if block_total > stage_total + 2 * _RESOLUTION else stage
    errors = {(p, id(c)): (sensitivity(p, c.gm) if p in c.blocks else 0.0) for c in options for p in paths}
    return _knapsack(alloc, options, target, blocks, lambda item, c: -sum(errors[(p, id(c))] for p in item))[0]


def _per_block(search: _Search, start: Candidate, sensitivity: Optional[Sensitivity]) -> Candidate:
    """Step 2: fill the budget block by block, then build and measure the result exactly.

    The fill works on estimated sums, so the exact count may miss: over the target (the
    estimate was optimistic), the fill is redone against a target lowered by the measured
    error; more than :data:`_CLOSE` under it (pessimistic), against one raised by it. At most
    three fills; the largest exact answer within the target wins (the one-size answer if none).
    """
    scale, best = 1.0, start
    for _ in range(3):
        choice = _allocate(search, start, sensitivity, scale)
        sizes = tuple((p, *c.sizes) for p, c in choice.items() if c.sizes != start.sizes)
        if not sizes:
            break
        cand = search.measure(start.options.replace(block_sizes=sizes))
        if search.exact(cand) <= search.target and cand.exact > best.exact:
            best = cand
        if (1 - _CLOSE) * search.target <= best.exact <= search.target:
            break
        scale *= search.target / cand.exact * (1 - 1e-3)
    return best


# ----------------------------------------------------------------------------- the search


def search_budget(model: nn.Module, inputs: Sequence[Any], options: MGICOptions, *, transform: Transform,
                  sensitivity: Optional[Sensitivity] = None, per_block: bool = True) -> torch.fx.GraphModule:
    """The largest transform of ``model`` whose ratio in ``options.target`` is at most the target.

    ``transform(model, inputs, options)`` runs one transform (``api._transform``) with
    concrete sizes. Returns the chosen network; its plan's ``budget`` records the
    target, the ratio achieved and how many networks were measured, and its options
    the sizes chosen (``block_sizes`` for blocks sized on their own). Raises
    :class:`MGICError` naming the smallest ratio reached when nothing fits.
    """
    search = _Search(model, inputs, options, transform)
    given = options.transitions
    best = search.uniform(bool(given))
    if best is None and given is None:
        best = search.uniform(True)  # not said: rewriting the width-changing blocks too may meet it
    if best is None:
        raise search.unreachable()
    chosen = _per_block(search, best, sensitivity) if per_block else best
    search.replay_warnings(chosen)
    plan = plan_of(chosen.gm)
    budget = Budget(search.metric, search.target, search.exact(chosen), len(search.seen))
    _attach(chosen.gm, plan, budget)
    return chosen.gm


def _attach(gm: torch.fx.GraphModule, plan: MGICPlan, budget: Budget) -> None:
    """The plan with the budget, and with the search's choice named where it left a block whole."""
    sized = {p for p, _, _ in plan.options.block_sizes}
    blocks = tuple(
        replace(d, reason=f"kept whole by the budget search, which spends the budget elsewhere (at the sizes it "
                          f"chose, {d.reason})")
        if not d.rewritten and d.path in sized and d.decline in (Decline.TOO_NARROW, Decline.NOT_SMALLER) else d
        for d in plan.blocks)
    attach_plan(gm, replace(plan, blocks=blocks, budget=budget))
