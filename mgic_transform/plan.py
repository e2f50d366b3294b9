"""What the compiler decided, per block: the contract between the passes, the report and the CLI.

:func:`mgic_transform.mgicify` stores an :class:`MGICPlan` on its result;
:func:`plan_of` reads it back (also from a copy reloaded with ``torch.load``). It
records the options the transform ran with and every *candidate* block the
analysis found, rewritten or not, so that :func:`mgic_transform.compare` can
explain each one.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Optional

from .options import MGICOptions

__all__ = ["BlockDecision", "BlockFit", "Budget", "Decline", "MGICPlan", "REWRITTEN", "SKIPPED", "attach_plan",
           "plan_of"]

REWRITTEN = "rewritten"
SKIPPED = "skipped"


class Decline(str, enum.Enum):
    """Why a candidate block was left alone: the type of ``BlockDecision.reason``.

    Code branches on this, never on the reason's text (which is for people).
    """

    NO_CHANNEL_DIM = "no_channel_dim"  # cannot tell which dimension holds the channels
    USER_SKIP = "user_skip"  # matched a ``skip=`` pattern (``BlockDecision.skip_pattern`` names it)
    TRANSITION = "transition"  # width- or stride-changing, and ``transitions=False``
    HEAD = "head"  # a transition whose output is the model's output (classifier, segmentation head)
    SINGLE_LAYER = "single_layer"  # a transition that is one channel-mixing layer (stem, expansion to the head)
    TOO_NARROW = "too_narrow"  # the rule gives it a single level
    SHARED_WEIGHTS = "shared_weights"  # a weight is also read outside the block
    FROZEN = "frozen"  # a parameter of the block has requires_grad=False
    UNSUPPORTED = "unsupported"  # the block cannot be re-instantiated at a level's width
    CONNECTOR = "connector"  # no transition connector fits its shapes
    NOT_SMALLER = "not_smaller"  # the MGIC block would have as many parameters or more

BlockKind = Literal["residual", "layer", "transition"]


@dataclass(frozen=True)
class BlockFit:
    """What calibration did to one rewritten block (``init="calibrate"`` / :func:`mgic_transform.calibrate`).

    Errors are relative output errors ``||MGIC(x) - target|| / ||target||`` over the
    calibration inputs ``x`` the block receives in the transformed network, where
    ``target`` is the original network's activation at the block's exit.

    Attributes:
        error_before: with the weights the block started from (the Galerkin init).
        error_after: after fitting.
        steps: optimizer steps taken.
        samples: calibration samples the block was fitted on.
        seconds: wall time of this block's fit.
    """

    error_before: float
    error_after: float
    steps: int
    samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



@dataclass(frozen=True)
class BlockDecision:
    """One candidate block and what happened to it.

    Attributes:
        path: module path of the block in the *original* model (the longest common
            prefix of the module paths of its layers, e.g. ``"layer1.0"``; ``""`` for
            blocks written inline at the top level).
        kind: ``"residual"`` (fork .. join unit), ``"layer"`` (one equal-width layer with
            its norm/activation) or ``"transition"`` (width-changing block).
        status: ``"rewritten"`` or ``"skipped"``.
        reason: why a skipped block was left alone (``None`` when rewritten).
        width: channel width of the block input (``c_in``).
        out_width: channel width of the block output (differs from ``width`` only for transitions).
        channel_dim: tensor dimension holding the channels at the block input (1 for NCHW, -1 for channels-last).
        levels: channel width of every level, finest first (``(256, 128, 64)``); empty when skipped.
        groups: group count used at every level, finest first; the coarsest is always 1.
        group_sizes: channels per group at every level (``width // groups``), finest first.
        sizes: the ``(group_size, coarsest_width)`` the block was built with (a budget search
            may size blocks on their own: ``MGICOptions.block_sizes``); empty when skipped.
        module: attribute name of the ``MGICBlock`` in the transformed GraphModule (``None`` when skipped).
        nodes: names of the original graph nodes the block covers.
        layers: module paths (original model) of the layers inside the block.
        params_before: parameters of the original block (in the original model).
        params_after: parameters of the ``MGICBlock`` (including the transition connector).
        analytic_params: the paper's formula (3.5) for this block, generalised to the rule in use
            (``hierarchy.analytic_params``; ``None`` when not applicable).
        decline: the kind of reason a skipped block was left alone (``None`` when rewritten).
        skip_pattern: the user's ``skip=`` pattern that matched the block, if any.
        init: with ``mgicify(..., init="inherit")``, how every layer and tensor of the block was
            initialised (:class:`~mgic_transform.passes.inherit.LayerInit`: inherited, or scratch
            and why); empty with the default ``init="scratch"``.
        fit: with calibration, the block's output error before and after fitting (:class:`BlockFit`).
    """

    path: str
    kind: BlockKind
    status: str
    reason: Optional[str]
    width: int
    out_width: int
    channel_dim: int
    levels: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    group_sizes: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()
    module: Optional[str] = None
    nodes: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    params_before: int = 0
    params_after: int = 0
    analytic_params: Optional[int] = None
    decline: Optional[Decline] = None
    skip_pattern: Optional[str] = None
    init: tuple[Any, ...] = ()
    fit: Optional[BlockFit] = None

    @property
    def rewritten(self) -> bool:
        return self.status == REWRITTEN

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("levels", "groups", "group_sizes", "sizes", "nodes", "layers", "init"):
            d[k] = list(d[k])
        d["decline"] = self.decline.value if self.decline is not None else None
        d["fit"] = self.fit.to_dict() if self.fit is not None else None
        return d


@dataclass(frozen=True)
class Budget:
    """What ``target_params`` / ``target_flops`` asked for and what the search found.

    Attributes:
        metric: ``"params"`` or ``"flops"``.
        target: the requested ratio (transformed / original).
        achieved: the ratio of the chosen network.
        candidates: how many (group_size, coarsest_width) pairs were measured.
    """

    metric: str
    target: float
    achieved: float
    candidates: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MGICPlan:
    """What a transform was asked to do and what it decided for every candidate block.

    Attributes:
        options: the :class:`~mgic_transform.MGICOptions` the transform ran with, sizes
            resolved (a budget search's chosen ``group_size`` / ``coarsest_width`` /
            ``block_sizes``; the target itself is in ``budget``).
        blocks: one :class:`BlockDecision` per candidate block, in graph order.
        notes: model-level remarks, e.g. "no conv/linear layer found".
        budget: set when the sizes were chosen by ``target_params`` / ``target_flops``.
        example_inputs: the inputs the analysis ran at (detached; not part of ``to_dict``).
    """

    options: MGICOptions
    blocks: tuple[BlockDecision, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = ()
    budget: Optional[Budget] = None
    example_inputs: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def rewritten(self) -> tuple[BlockDecision, ...]:
        return tuple(b for b in self.blocks if b.rewritten)

    @property
    def skipped(self) -> tuple[BlockDecision, ...]:
        return tuple(b for b in self.blocks if not b.rewritten)

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options.to_dict(),
            "blocks": [b.to_dict() for b in self.blocks],
            "notes": list(self.notes),
            "budget": self.budget.to_dict() if self.budget is not None else None,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a plan saved before ``options`` existed (version 0.1) gets its fields as options."""
        if "options" not in state:
            old = {k: state.pop(k) for k in ("group_size", "coarsest_width", "transitions", "skip", "rule", "init",
                                             "checkpoint") if k in state}
            state["options"] = MGICOptions(**old)
            state.setdefault("example_inputs", ())
        self.__dict__.update(state)


def attach_plan(gm: Any, plan: MGICPlan) -> None:
    """Store ``plan`` on ``gm`` where :func:`plan_of` finds it, also after ``torch.save`` / ``torch.load``.

    ``gm.meta["mgic"]`` is torch.fx's place for it, but pickling a GraphModule drops
    ``meta``; a plain attribute survives.
    """
    gm.meta["mgic"] = plan
    gm._mgic_plan = plan


def plan_of(gm: Any) -> Optional[MGICPlan]:
    """The :class:`MGICPlan` of a GraphModule that :func:`mgic_transform.mgicify` returned, or ``None``.

    Works on the result itself and on a copy reloaded with ``torch.load``:

    >>> plan = mt.plan_of(torch.load("resnet50_mgic.pt", weights_only=False))  # doctest: +SKIP
    >>> [d.path for d in plan.rewritten]                                       # doctest: +SKIP
    """
    from .errors import InputError

    meta = getattr(gm, "meta", None) or {}
    plan = meta.get("mgic") or getattr(gm, "_mgic_plan", None) or (getattr(gm, "_mgic_meta", None) or {}).get("mgic")
    if plan is not None and not isinstance(plan, MGICPlan):
        raise InputError(f"the model's meta['mgic'] is a {type(plan).__name__}, not an MGICPlan. Hint: pass the "
                         f"GraphModule that mgicify() returned.")
    if plan is not None and not plan.example_inputs and "mgic_example_inputs" in (getattr(gm, "_mgic_meta", None) or {}):
        plan = replace(plan, example_inputs=gm._mgic_meta["mgic_example_inputs"])  # saved by version 0.1
    return plan
