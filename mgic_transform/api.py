"""``mgicify``: validate the options, transform (to a budget, if asked), calibrate.

The pipeline of one transform is :func:`_transform`: trace -> shapes -> blocks ->
rewrite -> inherit -> finish; ``docs/design.md`` describes every step.
:func:`mgicify` is the public entry: it turns its keywords into one validated
:class:`~mgic_transform.MGICOptions`, runs :func:`_transform` once or lets the
budget search (:mod:`mgic_transform.budget`) run it on candidate sizes, then
calibrates the result when asked to.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx
from torch import nn

from ._modcopy import copy_structure, own_tensors
from .budget import search_budget
from .errors import ConfigError, InputError
from .inputs import as_input_tuple, infer_example_inputs
from .layers import example_input_shape
from .nn.mgic_block import MGICBlock
from .options import LeafSpec, MGICOptions
from .passes.blocks import find_blocks
from .passes.calibrate import DEFAULT_MAX_SAMPLES, CalibrationData, block_errors, calibrate
from .passes.inherit import inherit_weights
from .passes.ownership import mark_overwritable_inputs
from .passes.rewrite import rewrite_blocks
from .passes.shapes import propagate_other_size, propagate_shapes
from .plan import BlockDecision, MGICPlan, attach_plan
from .tracing import eliminate_dead_code, trace

__all__ = ["mgicify", "infer_example_inputs"]


def _drop_unreferenced_tensors(gm: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers that only a rewritten block read (e.g. a root-level layer-scale).

    ``delete_all_unused_submodules`` removes modules, not tensors held by modules
    that survive; left behind they would never get a gradient (and break DDP).
    Tensors of modules the graph calls are theirs to use and are kept.
    """
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for path, module in gm.named_modules():
        parts = path.split(".") if path else []
        if any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
            continue
        for name in [*module._parameters, *module._buffers]:
            full = f"{path}.{name}" if path else name
            if full not in read:
                module._parameters.pop(name, None)
                module._buffers.pop(name, None)


def _copy_training_flags(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Every module of the result takes the ``training`` flag of the input model's module at its path.

    Containers ``torch.fx`` creates for module paths start in train mode; a
    frozen BatchNorm inside a training model keeps its own flag.
    """
    original = dict(model.named_modules())
    for path, module in gm.named_modules():
        if path in original:
            module.training = original[path].training


_HOOK_KINDS = {"_forward_hooks": "forward hook", "_forward_pre_hooks": "forward pre-hook",
               "_backward_hooks": "backward hook", "_backward_pre_hooks": "backward pre-hook"}


def _dropped_hooks(model: nn.Module, gm: torch.fx.GraphModule) -> list[str]:
    """Hooks of ``model`` that never fire in ``gm``: on the model itself, on a container torch.fx traced
    through, or on a layer a rewritten block replaced. (A layer the result calls, or one inside a leaf it
    calls, keeps its hooks.)"""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    kept = {p for p in called if not isinstance(gm.get_submodule(p), MGICBlock)}
    dropped = []
    for path, module in model.named_modules():
        kinds = [kind for attr, kind in _HOOK_KINDS.items() if getattr(module, attr, None)]
        if not kinds:
            continue
        parts = path.split(".") if path else []
        if path and any(".".join(parts[:i]) in kept for i in range(1, len(parts) + 1)):
            continue
        dropped.append(f"{path or 'the model itself'!s} ({', '.join(kinds)})")
    return dropped


def _graph_inputs(gm: torch.fx.GraphModule, inputs: tuple) -> tuple:
    """One value per placeholder: the example inputs, then the defaults (concrete_args values) for the rest."""
    values = list(inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    starred = [n for n in placeholders if str(n.target).startswith("*")]  # *args / **kwargs take what is left
    placeholders = [n for n in placeholders if n not in starred]
    if starred and len(values) >= len(placeholders):
        return tuple(values)
    for node in placeholders[len(values):]:
        if node.args:
            values.append(node.args[0])
        else:
            raise InputError(
                f"the model's forward() takes an argument {node.target!r} that example_inputs does not cover. "
                f"Hint: pass example_inputs=(x, {node.target}) or fix it with concrete_args={{{node.target!r}: ...}}."
            )
    if len(values) > len(placeholders):
        names = ", ".join(str(n.target) for n in placeholders)
        raise InputError(
            f"the model's forward() takes {len(placeholders)} input(s) ({names}), got {len(values)} example inputs. "
            f"Hint: pass one tensor per forward() argument."
        )
    return tuple(values)


def _check_plain_module(model: nn.Module) -> None:
    """Wrappers and compiled modules cannot be traced by torch.fx: say what to pass instead."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise InputError(f"{type(model).__name__} is a wrapper that torch.fx cannot trace. Hint: pass model.module, "
                         f"then wrap the result.")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise InputError("a torch.compile()d module cannot be traced by torch.fx. Hint: pass model._orig_mod "
                         "(the module before torch.compile), then compile the result.")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"{type(model).__name__} is a TorchScript module, which torch.fx cannot trace. Hint: pass the "
                         f"original nn.Module (before torch.jit.script/trace).")
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise InputError(f"the model has uninitialised lazy parameters ({lazy[0]}). Hint: run model(example_inputs) "
                         f"once to initialise the lazy layers, then call mgicify.")


def _check_concrete_args(model: nn.Module, concrete_args: Any) -> Optional[dict[str, Any]]:
    """A dict from names of ``model.forward``'s (non-starred) parameters to the values to fix them to."""
    if concrete_args is None:
        return None
    if not isinstance(concrete_args, dict) or not all(isinstance(k, str) for k in concrete_args):
        raise ConfigError(f"concrete_args must be a dict from forward() argument names to values, got "
                          f"{concrete_args!r}. Hint: concrete_args={{\"flag\": True}}.")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return concrete_args
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in concrete_args if k not in names]
    if unknown:
        starred = any(k.lstrip("*") in params and params[k.lstrip("*")].kind in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in unknown)
        hint = ("*args and **kwargs cannot be fixed: they are left empty" if starred
                else f"{type(model).__name__}.forward() takes {', '.join(names) or 'no named arguments'}")
        raise ConfigError(f"concrete_args names {unknown}, which forward() has no argument for. Hint: {hint}.")
    return concrete_args


def _fixed_training_notes(model: nn.Module, gm: torch.fx.GraphModule) -> list[str]:
    """A note (also warned, to ``mgicify``'s caller) when the trace fixed ``self.training`` to the current mode."""
    if not gm.meta.get("reads_training"):
        return []
    where = ", ".join(repr(p or type(model).__name__) for p in gm.meta["reads_training"][:3])
    mode = "train" if model.training else "eval"
    note = (f"forward() of {where} reads self.training; torch.fx fixed it to {mode} mode, so the result always "
            f"takes the {mode}-mode branch there. Transform model.{'eval' if mode == 'train' else 'train'}() for "
            f"the other mode, or mark the module a leaf (leaf_modules=[...])")
    warnings.warn(note, UserWarning, stacklevel=3)
    return [note]


def mgicify(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    *,
    group_size: Optional[int] = None,
    coarsest_width: Optional[int] = None,
    skip: Iterable[str] = (),
    transitions: Optional[bool] = None,
    rule: str = "paper",
    target_params: Optional[float] = None,
    target_flops: Optional[float] = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Optional[dict[str, Any]] = None,
    init: str = "scratch",
    checkpoint: bool = False,
    block_sizes: Optional[dict[str, tuple[int, int]]] = None,
    calibration_steps: Optional[int] = None,
    calibration: Any = None,
    options: Optional[MGICOptions] = None,
) -> torch.fx.GraphModule:
    """Rewrite the equal-width blocks of ``model`` into multigrid-in-channels blocks (paper Algorithm 1).

    The model is traced with ``torch.fx``, its blocks are found from the graph's structure
    (:mod:`mgic_transform.passes.blocks`) and each becomes an :class:`~mgic_transform.MGICBlock`.
    ``model`` is never modified. Every keyword is a field of :class:`~mgic_transform.MGICOptions`
    (pass ``options=`` instead, not both); its docstring has the details.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.
        example_inputs: a tensor or tuple of tensors of the shape the model expects (only
            shapes are used); inferred from the first layer when omitted (``Conv2d(3, ...)``
            -> ``1x3x224x224``).
        group_size, coarsest_width: ``s_g`` (channels per group on the fine levels, default 32)
            and ``s_c`` (the coarsest, fully coupled level; default ``s_g``).
        skip: glob patterns over module paths (``"layer4.*"``) of blocks to leave alone.
        transitions: also rewrite width-changing blocks (a depthwise connector, then an MGIC
            block; paper Sec. 3.3). Not given: off, unless a budget needs it.
        rule: ``"paper"`` (default: the authors' networks, levels halve a block's narrowest
            width) or ``"compact"`` (much smaller networks); :mod:`mgic_transform.hierarchy`.
        target_params, target_flops: a budget instead of sizes: the largest network with at
            most this fraction of the original's parameters (or FLOPs, as
            :func:`~mgic_transform.compare` counts them), sized per block
            (:mod:`mgic_transform.budget`).
        leaf_modules, concrete_args: what ``torch.fx`` must not trace into; ``forward()`` arguments to fix.
        init: ``"scratch"`` (default), ``"calibrate"`` (compress a *trained* model: start from
            its weights and fit every block to its outputs on ``calibration`` data;
            :func:`mgic_transform.calibrate`) or ``"inherit"`` (its weights' Galerkin products
            alone, no data; :mod:`mgic_transform.passes.inherit`).
        checkpoint: activation checkpointing in every MGIC block (less training memory).
        block_sizes: ``{"layer4.*": (64, 128)}``: ``(group_size, coarsest_width)`` per block.
        calibration_steps: with ``init="calibrate"``: optimizer steps per block (default: calibrate's).
        calibration: with ``init="calibrate"``: inputs of the training data (a ``DataLoader`` of
            ``(input, target)`` pairs, a list of batches, or one tensor; at most 1,024 used).
        options: all of the above as one :class:`~mgic_transform.MGICOptions`.
    Returns:
        A trainable ``torch.fx.GraphModule``; :func:`mgic_transform.plan_of` gives its plan (the
        options it ran with, every candidate block with its decision), also after ``torch.load``.

    Raises:
        MGICError: an untraceable model, bad options or unusable inputs, with what to do.
    """
    opts = _options(options, dict(
        group_size=group_size, coarsest_width=coarsest_width, skip=skip, transitions=transitions, rule=rule,
        target_params=target_params, target_flops=target_flops, leaf_modules=leaf_modules,
        concrete_args=concrete_args, init=init, checkpoint=checkpoint, block_sizes=block_sizes,
        calibration_steps=calibration_steps))
    _check_model(model)
    _check_concrete_args(model, opts.concrete_args)
    _check_calibration(opts, calibration)
    inputs = _example_inputs(model, example_inputs)
    calibration = _read_calibration(calibration, inputs) if opts.init == "calibrate" else None
    if opts.target is not None:
        sensitivity = _block_sensitivity(model, calibration) if calibration is not None else None
        gm = search_budget(model, inputs, opts, transform=_transform, sensitivity=sensitivity)
    else:
        gm = _transform(model, inputs, opts)
    if calibration is not None:
        steps = {} if opts.calibration_steps is None else {"steps": opts.calibration_steps}
        calibrate(gm, model, calibration, **steps)
    return gm


def _options(options: Optional[MGICOptions], keywords: dict[str, Any]) -> MGICOptions:
    """The one :class:`MGICOptions` of a call: ``options=`` or the keywords, validated (not both)."""
    if options is None:
        return MGICOptions(**keywords)
    if not isinstance(options, MGICOptions):
        raise ConfigError(f"options must be an MGICOptions, got {type(options).__name__}. Hint: "
                          f"options=mt.MGICOptions(group_size=16).")
    defaults = MGICOptions()
    given = [k for k, v in keywords.items() if k in _FIELDS and v != _KEYWORD_DEFAULTS.get(k, getattr(defaults, k))]
    if given:
        raise ConfigError(f"pass options=MGICOptions(...) or keywords, not both (got {', '.join(given)} as well). "
                          f"Hint: options.replace({given[0]}=...).")
    return options


_FIELDS = {f for f in MGICOptions.__dataclass_fields__}
_KEYWORD_DEFAULTS = {"skip": (), "leaf_modules": (), "block_sizes": None, "calibration_steps": None}


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        hint = (f"pass an instance, e.g. {model.__name__}()" if isinstance(model, type) and issubclass(model, nn.Module)
                else "pass the model object (an nn.Module instance)")
        raise InputError(f"mgicify expects an nn.Module, got {type(model).__name__}. Hint: {hint}.")
    _check_plain_module(model)


def _check_calibration(options: MGICOptions, calibration: Any) -> None:
    if options.init == "calibrate" and calibration is None:
        raise ConfigError("init=\"calibrate\" fits every MGIC block to the trained model on calibration data, and "
                          "none was given. Hint: mgicify(model, x, init=\"calibrate\", calibration=loader), a few "
                          "hundred training inputs (a DataLoader, a list of batches or one tensor).")
    if calibration is not None and options.init != "calibrate":
        raise ConfigError(f"calibration data is used only with init=\"calibrate\" (got init={options.init!r}), so it "
                          f"would be ignored. Hint: pass init=\"calibrate\" as well.")


def _read_calibration(data: Any, inputs: tuple) -> list[tuple[torch.Tensor, ...]]:
    """The calibration samples, read once (a DataLoader or a generator may be iterated only once), checked."""
    calib = CalibrationData.read(data, len(inputs), inputs, DEFAULT_MAX_SAMPLES,
                                 inputs[0].device if inputs else torch.device("cpu"))
    return [calib.inputs]


def _block_sensitivity(model: nn.Module, calibration: list) -> Callable[[str, torch.fx.GraphModule], float]:
    """For the budget search: each block's output error at a candidate's sizes (``calibrate.block_errors``)."""
    errors: dict[int, dict[str, float]] = {}

    def sensitivity(path: str, gm: torch.fx.GraphModule) -> float:
        if id(gm) not in errors:  # the candidates live as long as the search: their ids stay theirs
            errors[id(gm)] = block_errors(gm, model, calibration)
        return errors[id(gm)].get(path, 0.0)

    return sensitivity


def _example_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is not None:
        return as_input_tuple(example_inputs)
    has_layers = any(example_input_shape(m) is not None for m in model.modules())
    return infer_example_inputs(model) if has_layers else ()


def _transform(model: nn.Module, inputs: tuple, options: MGICOptions) -> torch.fx.GraphModule:
    """One transform at the sizes in ``options`` (no target): the pipeline of ``docs/design.md``.

    Works on a copy of the module tree that shares the weights (cheap); the weights
    the result keeps are copied once at the end, the ones MGIC blocks replace never are.
    Buffers are cloned: tracing runs in-place buffer updates of ``forward()`` for real.
    """
    if options.target is not None:  # pragma: no cover - the budget search clears it
        raise ValueError("_transform needs concrete sizes; the budget search resolves targets")
    s_g, s_c = options.sizes
    options = options.replace(group_size=s_g, coarsest_width=s_c, transitions=options.rewrites_transitions)
    work = copy_structure(model, lambda t: t if isinstance(t, nn.Parameter) else t.clone())
    gm = trace(work, leaf_modules=options.leaf_modules, concrete_args=options.concrete_args)
    eliminate_dead_code(gm)
    has_layers = any(example_input_shape(m) is not None for m in model.modules())
    single_size = None
    if has_layers or inputs:
        propagate_shapes(gm, _graph_inputs(gm, inputs))
        single_size = propagate_other_size(gm, _graph_inputs(gm, inputs))  # shapes that hold at any size
    regions = find_blocks(gm, transitions=options.transitions) if has_layers else []
    decisions = rewrite_blocks(gm, regions, options)
    if options.init in ("inherit", "calibrate"):
        decisions = inherit_weights(gm, model, decisions)
    _finish(gm, model, options)
    notes = _notes(model, gm, options, decisions, has_layers=has_layers, single_size=single_size)
    attach_plan(gm, MGICPlan(options, tuple(decisions), tuple(notes),
                             example_inputs=tuple(t.detach() for t in inputs)))
    return gm


def _finish(gm: torch.fx.GraphModule, model: nn.Module, options: MGICOptions) -> None:
    """Clean the rewritten graph up and give the result its own weights and flags."""
    eliminate_dead_code(gm)
    mark_overwritable_inputs(gm)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    _drop_unreferenced_tensors(gm)
    own_tensors(gm, keep=lambda m: isinstance(m, MGICBlock))  # private copies of the kept original weights
    _copy_training_flags(model, gm)
    for module in gm.modules():
        if isinstance(module, MGICBlock):
            module.checkpoint = options.checkpoint


def _notes(model: nn.Module, gm: torch.fx.GraphModule, options: MGICOptions, decisions: Sequence[BlockDecision], *,
           has_layers: bool, single_size: Optional[str]) -> list[str]:
    """The plan's model-level notes; the ones a user must not miss are also warned."""
    unused = [p for p in options.skip if not any(d.skip_pattern == p for d in decisions)]
    if unused:
        warnings.warn(f"skip pattern(s) {unused} matched no block; module paths look like "
                      f"{[d.path for d in decisions[:3]]}", UserWarning, stacklevel=4)
    notes = _fixed_training_notes(model, gm)
    dropped = _dropped_hooks(model, gm)
    if dropped:
        note = (f"hooks that do not fire in the result: {'; '.join(dropped)} (the module was traced through or "
                f"replaced by an MGIC block). Register them on the result instead (gm.get_submodule(path))")
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=4)
    if options.init in ("inherit", "calibrate") and _looks_untrained(model):
        note = (f"init={options.init!r}, but the model's weights look freshly initialised (every BatchNorm has its "
                f"initial statistics): there may be nothing trained to inherit. Load the trained weights first")
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=4)
    if single_size:
        notes.append(f"{single_size}: blocks were checked at the example input size only; run the result at that size")
    if not has_layers:
        notes.append("the model has no Conv or Linear layer: nothing to rewrite")
    elif not decisions:
        notes.append("no equal-width block with a channel-mixing layer was found")
    return notes


def _looks_untrained(model: nn.Module) -> bool:
    """True when the model has BatchNorms and all of them still hold their initial running statistics."""
    norms = [m for m in model.modules() if isinstance(getattr(m, "running_mean", None), torch.Tensor)
             and isinstance(getattr(m, "running_var", None), torch.Tensor)]
    return bool(norms) and all(bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in norms)


