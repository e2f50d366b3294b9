"""What the compiler decided, per block: the contract between the passes, the report and the CLI.

:func:`mgic_transform.mgicify` stores an :class:`MGICPlan` on the result as
``gm.meta["mgic"]``. It records every *candidate* block the analysis found,
rewritten or not, so that :func:`mgic_transform.compare` can explain each one.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

__all__ = ["BlockDecision", "BlockFit", "Budget", "Decline", "MGICPlan", "REWRITTEN", "SKIPPED"]

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
        for k in ("levels", "groups", "group_sizes", "nodes", "layers", "init"):
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
    """The options a transform ran with and the decision for every candidate block."""

    group_size: int
    coarsest_width: int
    transitions: bool
    skip: tuple[str, ...] = ()
    blocks: tuple[BlockDecision, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = ()  # model-level remarks, e.g. "no conv/linear layer found"
    rule: str = "paper"  # the hierarchy rule (``mgic_transform.hierarchy``)
    budget: Optional[Budget] = None  # set when the sizes were chosen by target_params / target_flops
    init: str = "scratch"  # "inherit": the levels were built from the trained weights (``passes/inherit.py``)
    checkpoint: bool = False  # every MGIC block recomputes its activations in backward (``nn/checkpointing.py``)

    @property
    def rewritten(self) -> tuple[BlockDecision, ...]:
        return tuple(b for b in self.blocks if b.rewritten)

    @property
    def skipped(self) -> tuple[BlockDecision, ...]:
        return tuple(b for b in self.blocks if not b.rewritten)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "group_size": self.group_size,
            "coarsest_width": self.coarsest_width,
            "transitions": self.transitions,
            "skip": list(self.skip),
            "blocks": [b.to_dict() for b in self.blocks],
            "notes": list(self.notes),
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "init": self.init,
            "checkpoint": self.checkpoint,
        }
