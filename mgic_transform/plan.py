"""What the compiler decided, per block: the contract between the passes, the report and the CLI.

:func:`mgic_transform.mgicify` stores an :class:`MGICPlan` on the result as
``gm.meta["mgic"]``. It records every *candidate* block the analysis found,
rewritten or not, so that :func:`mgic_transform.compare` can explain each one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

__all__ = ["BlockDecision", "MGICPlan", "REWRITTEN", "SKIPPED"]

REWRITTEN = "rewritten"
SKIPPED = "skipped"

BlockKind = Literal["residual", "layer", "transition"]


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
        analytic_params: the paper's formula (3.5) for this block (``None`` when not applicable).
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

    @property
    def rewritten(self) -> bool:
        return self.status == REWRITTEN

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("levels", "groups", "group_sizes", "nodes", "layers"):
            d[k] = list(d[k])
        return d


@dataclass(frozen=True)
class MGICPlan:
    """The options a transform ran with and the decision for every candidate block."""

    group_size: int
    coarsest_width: int
    transitions: bool
    skip: tuple[str, ...] = ()
    blocks: tuple[BlockDecision, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = ()  # model-level remarks, e.g. "no conv/linear layer found"

    @property
    def rewritten(self) -> tuple[BlockDecision, ...]:
        return tuple(b for b in self.blocks if b.rewritten)

    @property
    def skipped(self) -> tuple[BlockDecision, ...]:
        return tuple(b for b in self.blocks if not b.rewritten)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_size": self.group_size,
            "coarsest_width": self.coarsest_width,
            "transitions": self.transitions,
            "skip": list(self.skip),
            "blocks": [b.to_dict() for b in self.blocks],
            "notes": list(self.notes),
        }
