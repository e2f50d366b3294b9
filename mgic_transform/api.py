"""``mgicify``: trace -> shapes -> blocks -> rewrite, with argument checking."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.fx
from torch import nn

from ._modcopy import copy_structure, own_tensors
from .errors import ConfigError, InputError
from .inputs import as_input_tuple, infer_example_inputs
from .layers import example_input_shape
from .nn.mgic_block import MGICBlock
from .passes.blocks import find_blocks
from .passes.inherit import inherit_weights
from .passes.ownership import mark_overwritable_inputs
from .budget import search_budget
from .hierarchy import RULES
from .passes.rewrite import RewriteOptions, rewrite_blocks
from .passes.shapes import propagate_other_size, propagate_shapes
from .plan import Budget, MGICPlan
from .tracing import LeafSpec, eliminate_dead_code, trace

__all__ = ["mgicify", "infer_example_inputs"]


def _normalise_skip(skip: Any) -> tuple[str, ...]:
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    try:
        patterns = tuple(skip)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"skip must be glob patterns over module paths, got {skip!r}. Hint: skip=[\"layer4.*\"].")
    return patterns


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


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}. Hint: {name}=True.")
    return value


def _check_leaf_modules(leaf_modules: Any) -> tuple:
    specs = (leaf_modules,) if isinstance(leaf_modules, (str, type)) else leaf_modules
    try:
        specs = tuple(specs)
    except TypeError:
        specs = None
    bad = [s for s in specs or () if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module)))]
    if specs is None or bad:
        raise ConfigError(
            f"leaf_modules must be nn.Module classes or glob patterns over module paths, got "
            f"{(bad[0] if bad else leaf_modules)!r}. Hint: leaf_modules=[MyAttention, \"backbone.head.*\"].")
    return specs


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


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}. Hint: e.g. {name}=32.")
    return value


def _check_target(target_params: Any, target_flops: Any, group_size: Any, coarsest_width: Any
                  ) -> Optional[tuple[str, float]]:
    """``("params" | "flops", ratio)`` when a budget was asked for, else ``None``."""
    given = [(m, v) for m, v in (("params", target_params), ("flops", target_flops)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError("pass target_params or target_flops, not both. Hint: the search meets one budget.")
    metric, value = given[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"target_{metric} must be a fraction of the original's {metric} in (0, 1], got {value!r}. "
                          f"Hint: target_{metric}=0.3 keeps at most 30%.")
    if group_size is not None or coarsest_width is not None:
        raise ConfigError(f"target_{metric} chooses group_size and coarsest_width itself; pass either the sizes or "
                          f"the target. Hint: drop group_size/coarsest_width.")
    return metric, float(value)


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


def _mgicify_to_budget(model: nn.Module, example_inputs: Any, target: tuple[str, float],
                       options: dict[str, Any]) -> torch.fx.GraphModule:
    """``mgicify`` with the ``group_size``/``coarsest_width`` that :mod:`mgic_transform.budget` finds for ``target``."""
    metric, ratio = target
    inputs = as_input_tuple(example_inputs) if example_inputs is not None else infer_example_inputs(model)
    gm, chosen, measured = search_budget(
        model, inputs, metric=metric, target=ratio,
        transform=lambda s_g, s_c: mgicify(model, inputs, group_size=s_g, coarsest_width=s_c, **options))
    plan = dataclasses.replace(gm.meta["mgic"], budget=Budget(metric, ratio, chosen.ratio, measured))
    gm.meta["mgic"] = gm._mgic_meta["mgic"] = plan
    return gm


def mgicify(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    *,
    group_size: Optional[int] = None,
    coarsest_width: Optional[int] = None,
    skip: Iterable[str] = (),
    transitions: bool = False,
    rule: str = "paper",
    target_params: Optional[float] = None,
    target_flops: Optional[float] = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Optional[dict[str, Any]] = None,
    init: str = "scratch",
    checkpoint: bool = False,
) -> torch.fx.GraphModule:
    """Rewrite the equal-width blocks of ``model`` into multigrid-in-channels blocks.

    The model is traced with ``torch.fx``; blocks are found from the graph's
    structure (see :mod:`mgic_transform.passes.blocks`) and each one becomes an
    :class:`~mgic_transform.MGICBlock` (paper Algorithm 1). ``model`` itself is
    never modified: the result owns copies of every layer it keeps.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.
        example_inputs: a tensor or tuple of tensors with the shape the model
            expects. Only shapes are used (fake tensors, no compute). Inferred
            from the first layer when omitted (``Conv2d(3, ...)`` -> ``1x3x224x224``).
        group_size: ``s_g``, channels per group in the grouped fine levels (default 32).
        coarsest_width: ``s_c``, the width of the coarsest, fully coupled level
            (see ``rule``). Defaults to ``group_size`` (the paper's usual ``s_c = s_g``).
        skip: glob patterns over module paths (``"layer4.*"``) of blocks to leave alone.
        transitions: also rewrite width-changing blocks (paper Sec. 3.3: a
            depthwise 3x3 connector to the new width, then an MGIC block).
        rule: how a block's levels are chosen (:mod:`mgic_transform.hierarchy`).
            ``"paper"`` (default) follows the authors' code and reproduces the
            paper's tables: levels halve the block's *narrowest* width (a
            bottleneck's inner width) and every layer of level ``j`` gets
            ``m_j / s_g`` groups. ``"compact"`` halves the outer width and groups
            by ``c_j / s_g``: much smaller networks than the paper's.
        target_params, target_flops: compress to a budget instead of fixed sizes:
            the largest network whose parameters (or multiply-adds at the example
            input) are at most this fraction of the original's. ``group_size`` and
            ``coarsest_width`` are then chosen by a search over powers of two
            (:mod:`mgic_transform.budget`); ``gm.meta["mgic"].budget`` records the
            target and the ratio achieved.
        leaf_modules: module classes or path patterns that ``torch.fx`` should not
            trace into (the escape hatch for data-dependent control flow).
        concrete_args: passed to ``torch.fx.Tracer.trace`` to fix Python-level arguments.
        init: ``"scratch"`` (default): every level of an MGIC block starts from fresh
            weights. ``"inherit"`` (experimental): the levels are built from the
            trained block's weights by Galerkin products ``R W P`` (block-diagonal
            parts at the grouped levels; see :mod:`mgic_transform.passes.inherit`),
            for compressing a trained model; ``BlockDecision.init`` records per
            layer whether it inherited or fell back to scratch, and why.
        checkpoint: activation checkpointing per MGIC block while training (autograd on):
            each block keeps only its input and recomputes the rest in the backward
            pass, trading compute for training memory; BatchNorm running statistics
            are updated once per step as without it (``nn/checkpointing.py``). Set
            ``block.checkpoint`` on a single block to choose per block.

    Returns:
        A trainable ``torch.fx.GraphModule``. ``gm.meta["mgic"]`` is an
        :class:`~mgic_transform.plan.MGICPlan` describing every candidate block
        (rewritten, or skipped with the reason); ``gm.meta["mgic_example_inputs"]``
        holds the inputs used for the analysis.

    Raises:
        MGICError: on an untraceable model, bad options or unusable example inputs.
    """
    if not isinstance(model, nn.Module):
        hint = (f"pass an instance, e.g. {model.__name__}()" if isinstance(model, type) and issubclass(model, nn.Module)
                else "pass the model object (an nn.Module instance)")
        raise InputError(f"mgicify expects an nn.Module, got {type(model).__name__}. Hint: {hint}.")
    _check_plain_module(model)
    if not isinstance(checkpoint, bool):
        raise ConfigError(f"checkpoint must be True or False, got {checkpoint!r}. Hint: mgicify(model, checkpoint=True).")
    if init not in ("scratch", "inherit"):
        raise ConfigError(f"init must be 'scratch' or 'inherit', got {init!r}. Hint: init='inherit' builds the MGIC "
                          f"blocks from the trained weights of model.")
    target = _check_target(target_params, target_flops, group_size, coarsest_width)
    if target is not None:
        return _mgicify_to_budget(model, example_inputs, target, dict(
            skip=skip, transitions=transitions, rule=rule, leaf_modules=tuple(leaf_modules), concrete_args=concrete_args,
            init=init, checkpoint=checkpoint))
    group_size = 32 if group_size is None else _check_positive_int("group_size", group_size)
    coarsest_width = group_size if coarsest_width is None else _check_positive_int("coarsest_width", coarsest_width)
    skip = _normalise_skip(skip)
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}. Hint: rule=\"paper\" "
                          f"builds the paper's networks, rule=\"compact\" smaller ones.")
    transitions = _check_bool("transitions", transitions)
    leaf_modules = _check_leaf_modules(leaf_modules)
    concrete_args = _check_concrete_args(model, concrete_args)
    has_layers = any(example_input_shape(m) is not None for m in model.modules())
    if example_inputs is not None:
        inputs = as_input_tuple(example_inputs)
    else:
        inputs = infer_example_inputs(model) if has_layers else ()

    # Work on a copy of the module tree that shares the weights (cheap); the
    # weights the result keeps are copied once at the end, the ones replaced by
    # MGIC blocks never are.
    # buffers are cloned: tracing runs in-place buffer updates of forward() for real
    work = copy_structure(model, lambda t: t if isinstance(t, nn.Parameter) else t.clone())
    gm = trace(work, leaf_modules=leaf_modules, concrete_args=concrete_args)
    eliminate_dead_code(gm)
    single_size = None
    if has_layers or inputs:
        propagate_shapes(gm, _graph_inputs(gm, inputs))
        single_size = propagate_other_size(gm, _graph_inputs(gm, inputs))  # shapes that hold at any size
    regions = find_blocks(gm, transitions=transitions) if has_layers else []
    options = RewriteOptions(rule=rule, group_size=group_size, coarsest_width=coarsest_width, skip=skip,
                             transitions=transitions)
    decisions = rewrite_blocks(gm, regions, options)
    if init == "inherit":
        decisions = inherit_weights(gm, model, decisions)
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
            module.checkpoint = checkpoint

    unused = [p for p in skip if not any(d.skip_pattern == p for d in decisions)]
    if unused:
        warnings.warn(f"skip pattern(s) {unused} matched no block; module paths look like "
                      f"{[d.path for d in decisions[:3]]}", UserWarning, stacklevel=2)
    notes = _fixed_training_notes(model, gm)
    dropped = _dropped_hooks(model, gm)
    if dropped:
        note = (f"hooks that do not fire in the result: {'; '.join(dropped)} (the module was traced through or "
                f"replaced by an MGIC block). Register them on the result instead (gm.get_submodule(path))")
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=2)
    if single_size:
        notes.append(f"{single_size}: blocks were checked at the example input size only; run the result at that size")
    if not has_layers:
        notes.append("the model has no Conv or Linear layer: nothing to rewrite")
    elif not decisions:
        notes.append("no equal-width block with a channel-mixing layer was found")
    gm.meta["mgic"] = MGICPlan(group_size, coarsest_width, transitions, skip, tuple(decisions), tuple(notes), rule=rule,
                               init=init, checkpoint=checkpoint)
    gm.meta["mgic_example_inputs"] = tuple(t.detach() for t in inputs)
    # GraphModule pickling rebuilds `meta` empty; a plain attribute survives torch.save / torch.load.
    gm._mgic_meta = {k: gm.meta[k] for k in ("mgic", "mgic_example_inputs")}
    return gm
