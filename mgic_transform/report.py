"""Compare a model with its MGIC rewrite: parameters, FLOPs, and one row per block.

:func:`compare` is the last stage of the pipeline (see ``DESIGN.md``)::

    >>> import torchvision, mgic_transform as mt
    >>> model = torchvision.models.resnet18()
    >>> gm = mt.mgicify(model)
    >>> report = mt.compare(model, gm)
    >>> print(report)                 # a table for the terminal
    >>> report.to_markdown()          # the same tables in Markdown
    >>> report.to_json()              # everything, machine-readable

What is counted, and how:

* **Parameters** are the number of scalar entries in ``model.parameters()``
  (shared tensors counted once; buffers such as BatchNorm running statistics
  are not parameters).
* **FLOPs** are counted by fvcore's ``FlopCountAnalysis`` on one forward pass
  with the example input: **one multiply-add is one FLOP**, the convention of
  the MGIC paper's tables (and of most CNN papers), so a ``c -> c`` 3x3
  convolution on an ``h x w`` map is ``9 c^2 h w`` FLOPs, not twice that.
* Operators fvcore has no formula for (element-wise ``add``/``sub``, pooling,
  ...) are **listed** in the report, per model, with how often they ran. They
  are not part of the FLOP totals; the report says so rather than scoring them
  as zero in silence.
* Per block, the **analytic** parameter count is the paper's formula (3.5),
  ``sum_j s_g c (d^2 + 1) / 2^j + s_c^2 d^2``, generalised by the compiler to
  the block's actual layers (``BlockDecision.analytic_params``). It grows
  linearly in the width ``c``; compare it with the counted ``params after``.

The report is built from the :class:`~mgic_transform.plan.MGICPlan` that
:func:`mgic_transform.mgicify` leaves on its result as ``gm.meta["mgic"]``:
every candidate block is one :class:`BlockRow`, rewritten or not, and a block
left alone carries the compiler's reason.

Counting never changes the models: fvcore runs, in eval mode under
``torch.no_grad()``, on a private copy of each model's module tree that shares
the weights (no extra memory for them) but has its own buffers, attributes,
flags and no hooks. fvcore's scope hooks land on the copy, a forward that
updates a buffer or an attribute updates the copy's, and a failed count
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._modcopy import copy_structure
from .errors import InputError, first_line
from .inputs import as_input_tuple, infer_example_inputs
from .plan import BlockDecision, Budget, MGICPlan

__all__ = ["BlockRow", "Report", "compare", "count_params", "count_flops", "eval_mode", "FlopCount", "FLOP_CONVENTION"]

FLOP_CONVENTION = "1 FLOP = 1 multiply-add (fvcore; the convention of the MGIC paper's tables)"

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
        group_size, coarsest_width, transitions, skip, rule, init, checkpoint: the options of
            the transform (``None``/empty when the transformed model carries no plan).
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
    group_size: Optional[int] = None
    coarsest_width: Optional[int] = None
    transitions: bool = False
    skip: tuple[str, ...] = ()
    rule: Optional[str] = None
    budget: Optional[Budget] = None
    init: Optional[str] = None
    checkpoint: bool = False
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
                "rule": self.rule,
                "budget": self.budget.to_dict() if self.budget is not None else None,
                "group_size": self.group_size,
                "coarsest_width": self.coarsest_width,
                "transitions": self.transitions,
                "skip": list(self.skip),
                "init": self.init,
                "checkpoint": self.checkpoint,
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
        transformed: the ``GraphModule`` that ``mgicify`` returned. Its
            ``meta["mgic"]`` plan gives the per-block rows (a GraphModule reloaded
            with ``torch.load`` keeps a copy of it); without it the report has totals only.
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
    # `_mgic_meta` is the copy of the plan that survives torch.save / torch.load (which empty `meta`)
    meta = {**getattr(transformed, "_mgic_meta", {}), **(getattr(transformed, "meta", None) or {})}
    plan = meta.get("mgic")
    if plan is not None and not isinstance(plan, MGICPlan):
        raise InputError(
            f"transformed.meta['mgic'] is a {type(plan).__name__}, not an MGICPlan; "
            "pass the GraphModule returned by mgicify()"
        )
    if example_inputs is None:
        example_inputs = meta.get("mgic_example_inputs")
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
        group_size=plan.group_size if plan is not None else None,
        coarsest_width=plan.coarsest_width if plan is not None else None,
        transitions=plan.transitions if plan is not None else False,
        skip=tuple(plan.skip) if plan is not None else (),
        rule=plan.rule if plan is not None else None,
        budget=plan.budget if plan is not None else None,
        init=plan.init if plan is not None else None,  # a plan pickled before the field reads the class default
        checkpoint=plan.checkpoint if plan is not None else False,
        uncounted_ops_before=_sorted_ops(before.uncounted),
        uncounted_ops_after=_sorted_ops(after.uncounted),
        notes=tuple(notes),
    )


def _ordered(decisions: Iterable[BlockDecision]) -> list[BlockDecision]:
    """Rewritten blocks first, each group in the compiler's (model) order."""
    decisions = list(decisions)
    return [d for d in decisions if d.rewritten] + [d for d in decisions if not d.rewritten]


def _block_row(d: BlockDecision, original: nn.Module, transformed: nn.Module, before: "FlopCount", after: "FlopCount") -> BlockRow:
    layers = _outermost(d.layers)
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
    )


# --------------------------------------------------------------------------- counting


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


def _outermost(paths: Iterable[str]) -> tuple[str, ...]:
    """Drop every path that lies inside another one, so nothing is counted twice.

    >>> _outermost(["a.b", "a", "c.d"])
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
        flops = [self.by_module.get(p) for p in _outermost(paths)]
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
    if r.group_size is None:
        options = "options: unknown (no MGIC plan on the transformed model)"
    else:
        skip = ", ".join(r.skip) if r.skip else "none"
        options = (
            f"rule {r.rule}, group size {r.group_size}, coarsest width {r.coarsest_width}, "
            f"transitions {'on' if r.transitions else 'off'}, skip {skip}, init {r.init}"
            + (", checkpointed blocks" if r.checkpoint else "")
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
    sections: list[tuple[str, Table]] = [(
        "Totals",
        (
            ("", "before", "after", "after/before"),
            (
                ("parameters", human(r.params_before), human(r.params_after), _fmt_ratio(r.params_ratio)),
                ("FLOPs", human(r.flops_before), human(r.flops_after), _fmt_ratio(r.flops_ratio)),
            ),
            "lrrr",
        ),
    )]
    if r.rewritten:
        sections.append((
            f"Rewritten blocks ({len(r.rewritten)})",
            (
                ("block", "kind", "width", "levels", "group sizes", "params before", "params after",
                 "analytic (3.5)", "FLOPs before", "FLOPs after"),
                [
                    (_block_name(b.path), b.kind, _width(b), _dims(b.levels), _dims(b.group_sizes),
                     human(b.params_before), human(b.params_after), human(b.analytic_params),
                     human(b.flops_before), human(b.flops_after))
                    for b in r.rewritten
                ],
                "lllllrrrrr",
            ),
        ))
    if r.skipped:
        sections.append((
            f"Blocks left alone ({len(r.skipped)})",
            (
                ("block", "kind", "width", "params", "FLOPs", "reason"),
                [
                    (_block_name(b.path), b.kind, _width(b), human(b.params_before), human(b.flops_before), b.reason or "-")
                    for b in r.skipped
                ],
                "lllrrl",
            ),
        ))
    if r.uncounted_ops_before or r.uncounted_ops_after:
        before, after = dict(r.uncounted_ops_before), dict(r.uncounted_ops_after)
        ops = list(dict.fromkeys([*before, *after]))
        sections.append((
            "Ops fvcore cannot count (times run; not in the FLOPs)",
            (("op", "before", "after"), [(op, str(before.get(op, 0)), str(after.get(op, 0))) for op in ops], "lrr"),
        ))
    return sections


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
