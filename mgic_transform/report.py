"""Compare a model with its MGIC rewrite: parameters, FLOPs, and one row per block.

:func:`compare` is the last stage of the pipeline (``docs/design.md``)::

    >>> import torchvision, mgic_transform as mt
    >>> model = torchvision.models.resnet18()
    >>> gm = mt.mgicify(model)
    >>> report = mt.compare(model, gm)
    >>> print(report)                 # a table for the terminal
    >>> report.to_markdown()          # the same tables in Markdown
    >>> report.to_json()              # everything, machine-readable

What is counted, and how, is :mod:`mgic_transform.counting` (the budget search counts the
same way): parameters exactly; FLOPs with fvcore, **one multiply-add = one FLOP**, the
convention of the MGIC paper's tables, so a ``c -> c`` 3x3 convolution on an ``h x w`` map
is ``9 c^2 h w`` FLOPs. Operators fvcore has no formula for (element-wise ``add``/``sub``,
pooling, ...) are **listed** in the report with how often they ran; they are not part of
the totals, and the report says so.

Per block, the **analytic** parameter count is the paper's formula (3.5),
``sum_j s_g c (d^2 + 1) / 2^j + s_c^2 d^2``, generalised by the compiler to the block's
actual layers (``BlockDecision.analytic_params``). With calibration
(``init="calibrate"``), every rewritten block also shows its relative output error before
and after fitting (``BlockDecision.fit``).

The report is built from the :class:`~mgic_transform.plan.MGICPlan` that
:func:`mgic_transform.mgicify` leaves on its result (:func:`mgic_transform.plan_of`): every
candidate block is one :class:`BlockRow`, rewritten or not, and a block left alone carries
the compiler's reason. The options the transform ran with are ``Report.options``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .counting import FLOP_CONVENTION, FlopCount, count_flops, count_params, count_params_of, eval_mode, outermost
from .inputs import as_input_tuple, infer_example_inputs
from .options import MGICOptions
from .plan import BlockDecision, BlockFit, Budget, plan_of

__all__ = ["BlockRow", "Report", "compare", "count_params", "count_flops", "eval_mode", "FlopCount", "FLOP_CONVENTION"]

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class BlockRow:
    """One candidate block of the original model and what the rewrite did to it.

    Attributes:
        path: module path of the block in the original model (``""`` = top level).
        kind: ``"residual"``, ``"layer"`` or ``"transition"`` (see :class:`~mgic_transform.plan.BlockDecision`).
        rewritten: whether the block was replaced by an ``MGICBlock``.
        reason: why the block was left alone (``None`` when rewritten).
        width: channels entering the block (``c``); ``out_width`` the channels leaving it.
        levels: channel width of every MGIC level, finest first (empty when left alone).
        group_sizes: channels per group at every level, finest first.
        groups: group count at every level, finest first.
        module: attribute name of the ``MGICBlock`` in the transformed model.
        params_before: parameters of the block's layers in the original model (counted).
        params_after: parameters of the block in the transformed model (counted): the
            ``MGICBlock`` when rewritten; equal to ``params_before`` for a block left alone
            (a block nested inside it and rewritten on its own has its own row).
        analytic_params: the paper's formula (3.5) for this block, ``None`` when the
            compiler has no formula for it.
        flops_before: FLOPs of the block's layers in the original model (fvcore, 1 multiply-add = 1 FLOP);
            ``None`` when FLOPs could not be counted.
        flops_after: FLOPs of the block in the transformed model; ``None`` when not counted.
        fit: with calibration, the block's relative output error before and after fitting.
    """

    path: str
    kind: str
    rewritten: bool
    reason: Optional[str]
    width: int
    out_width: int
    levels: tuple[int, ...]
    group_sizes: tuple[int, ...]
    groups: tuple[int, ...]
    module: Optional[str]
    params_before: int
    params_after: int
    analytic_params: Optional[int]
    flops_before: Optional[int]
    flops_after: Optional[int]
    fit: Optional[BlockFit] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "status": "rewritten" if self.rewritten else "skipped",
            "reason": self.reason,
            "width": self.width,
            "out_width": self.out_width,
            "levels": list(self.levels),
            "group_sizes": list(self.group_sizes),
            "groups": list(self.groups),
            "module": self.module,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "analytic_params": self.analytic_params,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "fit": self.fit.to_dict() if self.fit is not None else None,
        }


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Report:
    """Parameters and FLOPs of a model before and after :func:`mgic_transform.mgicify`.

    Build one with :func:`compare`. Totals are whole-model figures; ``blocks`` has
    one :class:`BlockRow` per candidate block (rewritten first, in model order, then
    the blocks left alone). Ratios are ``after / before`` (``< 1`` means smaller).

    Attributes:
        params_before, params_after: parameters of the two models.
        flops_before, flops_after: FLOPs of one forward pass (1 multiply-add = 1 FLOP),
            ``None`` when fvcore could not trace the model (see ``notes``).
        blocks: one row per candidate block.
        input_shapes: shapes of the example inputs the FLOPs were counted with.
        options: the :class:`~mgic_transform.MGICOptions` the transform ran with (``None``
            when the transformed model carries no plan).
        budget: the ``target_params``/``target_flops`` request and what the search achieved, if any.
        uncounted_ops_before, uncounted_ops_after: ``(op, times it ran)`` for the
            operators fvcore has no FLOP formula for; their cost is *not* in the totals.
        notes: remarks from the compiler and from counting.
    """

    params_before: int
    params_after: int
    flops_before: Optional[int]
    flops_after: Optional[int]
    blocks: tuple[BlockRow, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    options: Optional[MGICOptions] = None
    budget: Optional[Budget] = None
    uncounted_ops_before: tuple[tuple[str, int], ...] = ()
    uncounted_ops_after: tuple[tuple[str, int], ...] = ()
    notes: tuple[str, ...] = ()
    flop_convention: str = FLOP_CONVENTION

    # ratios are derived, never stored, so they cannot disagree with the counts
    @property
    def params_ratio(self) -> Optional[float]:
        """``params_after / params_before`` (``None`` for a model without parameters)."""
        return _ratio(self.params_after, self.params_before)

    @property
    def flops_ratio(self) -> Optional[float]:
        """``flops_after / flops_before`` (``None`` when FLOPs were not counted)."""
        return _ratio(self.flops_after, self.flops_before)

    @property
    def rewritten(self) -> tuple[BlockRow, ...]:
        return tuple(b for b in self.blocks if b.rewritten)

    @property
    def skipped(self) -> tuple[BlockRow, ...]:
        return tuple(b for b in self.blocks if not b.rewritten)

    # -- serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as plain JSON-safe Python (ints, floats, str, lists, dicts)."""
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_ratio": self.flops_ratio,
            "flop_convention": self.flop_convention,
            "input_shapes": [list(s) for s in self.input_shapes],
            "options": {
                **(self.options.to_dict() if self.options is not None else {}),
                "budget": self.budget.to_dict() if self.budget is not None else None,
            },
            "blocks": [b.to_dict() for b in self.blocks],
            "uncounted_ops": {
                "before": dict(self.uncounted_ops_before),
                "after": dict(self.uncounted_ops_after),
            },
            "notes": list(self.notes),
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """The report as Markdown: a summary table, the blocks, and the ops fvcore could not count."""
        out = ["# MGIC comparison", "", _preamble(self), ""]
        for title, table in _sections(self):
            out += [f"## {title}", "", _markdown_table(*table), ""]
        out += _notes_lines(self, heading="## Notes\n", bullet="- ")
        return "\n".join(out).rstrip() + "\n"

    def __str__(self) -> str:
        out = ["MGIC comparison", _preamble(self), ""]
        for title, table in _sections(self):
            out += [f"{title}:", _text_table(*table), ""]
        out += _notes_lines(self, heading="Notes:", bullet="  * ")
        return "\n".join(out).rstrip()


# --------------------------------------------------------------------------- compare


def compare(
    original: nn.Module,
    transformed: nn.Module,
    example_inputs: Optional[ExampleInputs] = None,
) -> Report:
    """Count parameters and FLOPs of ``original`` and its MGIC rewrite ``transformed``.

    Args:
        original: the model handed to :func:`mgic_transform.mgicify`. Not modified.
        transformed: the ``GraphModule`` that ``mgicify`` returned. Its plan
            (:func:`~mgic_transform.plan_of`, also after ``torch.load``) gives the per-block
            rows; without one the report has totals only.
        example_inputs: a tensor or a tuple of tensors to count FLOPs with. Defaults
            to the input ``mgicify`` used (``transformed.meta["mgic_example_inputs"]``),
            or else one inferred from the first conv/linear layer
            (``Conv2d(3, ...)`` -> ``1x3x224x224``).

    Returns:
        A :class:`Report`. FLOPs follow fvcore: one multiply-add is one FLOP.

    Raises:
        InputError: ``example_inputs`` is not a tensor or tuple of tensors, or none was
            given and none can be inferred.
    """
    plan = plan_of(transformed)
    if example_inputs is None and plan is not None:
        example_inputs = plan.example_inputs or None
    # the input mgicify used, else the same guess mgicify makes
    inputs = as_input_tuple(example_inputs, allow_empty=True) if example_inputs is not None \
        else infer_example_inputs(original)

    before = count_flops(original, inputs)
    after = count_flops(transformed, inputs)
    blocks = () if plan is None else tuple(
        _block_row(d, original, transformed, before, after) for d in _ordered(plan.blocks)
    )
    notes = list(plan.notes) if plan is not None else [
        "the transformed model carries no MGIC plan (meta['mgic']), so there are no per-block rows; "
        "compare the GraphModule returned by mgicify() to get them"
    ]
    notes += [f"FLOPs of the {which} model not counted: {c.error}" for which, c in (("original", before), ("transformed", after)) if c.error]
    return Report(
        params_before=count_params(original),
        params_after=count_params(transformed),
        flops_before=before.total,
        flops_after=after.total,
        blocks=blocks,
        input_shapes=tuple(tuple(t.shape) for t in inputs),
        options=plan.options if plan is not None else None,
        budget=plan.budget if plan is not None else None,
        uncounted_ops_before=_sorted_ops(before.uncounted),
        uncounted_ops_after=_sorted_ops(after.uncounted),
        notes=tuple(notes),
    )


def _ordered(decisions: Iterable[BlockDecision]) -> list[BlockDecision]:
    """Rewritten blocks first, each group in the compiler's (model) order."""
    decisions = list(decisions)
    return [d for d in decisions if d.rewritten] + [d for d in decisions if not d.rewritten]


def _block_row(d: BlockDecision, original: nn.Module, transformed: nn.Module, before: "FlopCount", after: "FlopCount") -> BlockRow:
    layers = outermost(d.layers)
    params_before = count_params_of(original, layers)
    if d.rewritten and d.module is not None:
        params_after = count_params_of(transformed, (d.module,))
        flops_after = after.of((d.module,))
    else:
        # A block left alone keeps its layers. Blocks nested in it may have been rewritten
        # on their own (the reason says so); their rows carry that change, so this row
        # shows the block unchanged and the rows add up to the model's totals.
        params_after = params_before
        flops_after = before.of(layers)
    return BlockRow(
        path=d.path,
        kind=d.kind,
        rewritten=d.rewritten,
        reason=d.reason,
        width=d.width,
        out_width=d.out_width,
        levels=tuple(d.levels),
        group_sizes=tuple(d.group_sizes),
        groups=tuple(d.groups),
        module=d.module,
        params_before=params_before,
        params_after=params_after,
        analytic_params=d.analytic_params,
        flops_before=before.of(layers),
        flops_after=flops_after,
        fit=d.fit,
    )


# --------------------------------------------------------------------------- formatting


def _ratio(after: Optional[int], before: Optional[int]) -> Optional[float]:
    if after is None or before is None or before == 0:
        return None
    return after / before


def _sorted_ops(ops: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(((str(k), int(v)) for k, v in ops.items()), key=lambda kv: (-kv[1], kv[0])))


def human(n: Optional[float]) -> str:
    """``1234567 -> '1.23M'``; ``None`` -> ``'-'`` (not counted)."""
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None or math.isnan(r) else f"{r:.3f}x"


def _dims(xs: Sequence[int]) -> str:
    return "/".join(str(x) for x in xs) if xs else "-"


def _block_name(path: str) -> str:
    return path or "(top level)"


def _width(row: BlockRow) -> str:
    return str(row.width) if row.width == row.out_width else f"{row.width}->{row.out_width}"


def _preamble(r: Report) -> str:
    shapes = ", ".join("x".join(str(d) for d in s) for s in r.input_shapes) or "-"
    o = r.options
    if o is None:
        options = "options: unknown (no MGIC plan on the transformed model)"
    else:
        skip = ", ".join(o.skip) if o.skip else "none"
        s_g, s_c = o.sizes
        options = (
            f"rule {o.rule}, group size {s_g}, coarsest width {s_c}"
            + (f" ({len(o.block_sizes)} blocks sized on their own)" if o.block_sizes else "")
            + f", transitions {'on' if o.transitions else 'off'}, skip {skip}, init {o.init}"
            + (", checkpointed blocks" if o.checkpoint else "")
        )
        if r.budget is not None:
            options += (f"; sizes chosen for target_{r.budget.metric}={r.budget.target:g} "
                        f"(achieved {r.budget.achieved:.3f} of the original's {r.budget.metric}, "
                        f"{r.budget.candidates} candidates measured)")
    return (
        f"Input {shapes}; {options}. FLOPs: {r.flop_convention}; "
        "ops fvcore cannot count are listed, not included."
    )


Table = tuple[Sequence[str], Sequence[Sequence[str]], str]  # headers, rows, alignment ("l"/"r" per column)


def _sections(r: Report) -> list[tuple[str, Table]]:
    """The report's tables, shared by the text and Markdown renderings."""
    sections = [("Totals", _totals(r))]
    if r.rewritten:
        sections.append((f"Rewritten blocks ({len(r.rewritten)})", _rewritten_table(r.rewritten)))
    if r.skipped:
        sections.append((f"Blocks left alone ({len(r.skipped)})", (
            ("block", "kind", "width", "params", "FLOPs", "reason"),
            [(_block_name(b.path), b.kind, _width(b), human(b.params_before), human(b.flops_before), b.reason or "-")
             for b in r.skipped],
            "lllrrl")))
    if r.uncounted_ops_before or r.uncounted_ops_after:
        before, after = dict(r.uncounted_ops_before), dict(r.uncounted_ops_after)
        ops = list(dict.fromkeys([*before, *after]))
        sections.append(("Ops fvcore cannot count (times run; not in the FLOPs)", (
            ("op", "before", "after"), [(op, str(before.get(op, 0)), str(after.get(op, 0))) for op in ops], "lrr")))
    return sections


def _totals(r: Report) -> Table:
    return (("", "before", "after", "after/before"),
            (("parameters", human(r.params_before), human(r.params_after), _fmt_ratio(r.params_ratio)),
             ("FLOPs", human(r.flops_before), human(r.flops_after), _fmt_ratio(r.flops_ratio))),
            "lrrr")


def _rewritten_table(rows: Sequence[BlockRow]) -> Table:
    """One row per rewritten block; with calibration, a column with its output error before -> after fitting."""
    fitted = any(b.fit is not None for b in rows)
    headers = ("block", "kind", "width", "levels", "group sizes", "params before", "params after",
               "analytic (3.5)", "FLOPs before", "FLOPs after")
    headers += ("block output error: start -> calibrated",) if fitted else ()
    table = []
    for b in rows:
        cells = (_block_name(b.path), b.kind, _width(b), _dims(b.levels), _dims(b.group_sizes),
                 human(b.params_before), human(b.params_after), human(b.analytic_params),
                 human(b.flops_before), human(b.flops_after))
        if fitted:
            cells += (f"{b.fit.error_before:.3f} -> {b.fit.error_after:.3f}" if b.fit is not None else "-",)
        table.append(cells)
    return headers, table, "lllllrrrrr" + ("r" if fitted else "")


def _notes_lines(r: Report, heading: str, bullet: str) -> list[str]:
    return ([heading] + [bullet + n for n in r.notes]) if r.notes else []


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            (c.rjust(w) if a == "r" else c.ljust(w)) for c, w, a in zip(cells, widths, align)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join(["  " + line(headers), "  " + rule] + ["  " + line(r) for r in rows])


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    head = "| " + " | ".join(esc(h) for h in headers) + " |"
    rule = "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])
