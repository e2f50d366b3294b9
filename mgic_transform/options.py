"""Every choice a transform makes, in one typed object validated once: :class:`MGICOptions`.

``mgicify(model, x, group_size=16, rule="compact")`` builds one from its
keywords, the CLI builds one from its flags, and the budget search derives
the candidates it measures with ``dataclasses.replace(options, ...)``, which
runs the same checks again. The transform stores the options it ran with on
its plan (``plan.options``), and :func:`mgic_transform.compare` reads them
from there. No other object carries options, so no path can read them
differently (a string ``leaf_modules`` once became a tuple of characters on
one path and not on the other).

As in ``torch.ao.quantization``'s ``PrepareCustomConfig``, a bad value is
refused when the object is made, with a message that says what to do:

>>> MGICOptions(group_size=0)
Traceback (most recent call last):
...
mgic_transform.errors.ConfigError: group_size must be a positive integer, got 0. Hint: e.g. group_size=32.

Numbers may be Python, NumPy or 0-d tensor numbers (``np.int64(8)``,
``torch.tensor(0.5)``); they are stored as ``int`` / ``float``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .errors import ConfigError
from .hierarchy import RULES

__all__ = ["MGICOptions", "LeafSpec", "INITS", "DEFAULT_GROUP_SIZE"]

LeafSpec = Union[type, str]  # an nn.Module subclass, or a glob pattern over module paths

INITS: tuple[str, ...] = ("scratch", "inherit", "calibrate")
DEFAULT_GROUP_SIZE = 32


def _as_number(value: Any) -> Any:
    """A 0-d tensor as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def _int(name: str, given: Any, *, allow_none: bool = True) -> Optional[int]:
    value = _as_number(given)
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1:
        return int(value)
    raise ConfigError(f"{name} must be a positive integer, got {given!r}. Hint: e.g. {name}=32.")


def _ratio(name: str, given: Any) -> Optional[float]:
    value = _as_number(given)
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < float(value) <= 1:
        return float(value)
    metric = name.removeprefix("target_")
    raise ConfigError(f"{name} must be a fraction of the original's {metric} in (0, 1], got {given!r}. "
                      f"Hint: {name}=0.3 keeps at most 30%.")


def _steps(given: Any) -> Optional[int]:
    value = _as_number(given)
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0:
        return int(value)
    raise ConfigError(f"calibration_steps must be a whole number >= 0, got {given!r}. Hint: calibration_steps=100.")


def _bool(name: str, value: Any, *, allow_none: bool = False) -> Optional[bool]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be True or False, got {value!r}. Hint: {name}=True.")


def _patterns(value: Any) -> tuple[str, ...]:
    """``skip``: one glob pattern or an iterable of them."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else _tuple(value)
    if items is None or not all(isinstance(p, str) for p in items):
        raise ConfigError(f"skip must be glob patterns over module paths, got {value!r}. Hint: skip=[\"layer4.*\"].")
    return items


def _leaves(value: Any) -> tuple[LeafSpec, ...]:
    """``leaf_modules``: nn.Module classes or glob patterns, one or an iterable of them (a string is one pattern)."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, type)) else _tuple(value)
    bad = [s for s in items or () if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module)))]
    if items is None or bad:
        raise ConfigError(
            f"leaf_modules must be nn.Module classes or glob patterns over module paths, got "
            f"{(bad[0] if bad else value)!r}. Hint: leaf_modules=[MyAttention, \"backbone.head.*\"].")
    return items


def _tuple(value: Any) -> Optional[tuple]:
    if isinstance(value, (bytes, Mapping)):
        return None
    try:
        return tuple(value)
    except TypeError:
        return None


def _concrete_args(value: Any) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"concrete_args must be a dict from forward() argument names to values, got "
                          f"{value!r}. Hint: concrete_args={{\"flag\": True}}.")
    return dict(value)


def _block_sizes(value: Any) -> tuple[tuple[str, int, int], ...]:
    """``{"layer4.*": (64, 128)}`` (or ``(pattern, s_g, s_c)`` triples) -> ``(("layer4.*", 64, 128),)``."""
    if value is None or (isinstance(value, (tuple, list, dict)) and not value):
        return ()
    if isinstance(value, Mapping):
        entries = [(k, *(_tuple(v) or (None,))) for k, v in value.items()]
    else:
        entries = [_tuple(t) or () for t in _tuple(value) or [()]] if not isinstance(value, str) else [()]
    if not all(len(e) == 3 and isinstance(e[0], str) for e in entries):
        raise ConfigError(f"block_sizes must map glob patterns over block paths to (group_size, coarsest_width), "
                          f"got {value!r}. Hint: block_sizes={{\"layer4.*\": (64, 128)}}.")
    return tuple((p, _int("block_sizes group_size", g, allow_none=False),
                  _int("block_sizes coarsest_width", c, allow_none=False)) for p, g, c in entries)


@dataclass(frozen=True)
class MGICOptions:
    """The options of one transform (see :func:`mgic_transform.mgicify` for what each does).

    Attributes:
        group_size: ``s_g``, channels per group on the fine levels. ``None``: 32, or
            chosen by the budget search when a target is set.
        coarsest_width: ``s_c``, the coarsest, fully coupled level's width. ``None``:
            ``group_size``, or chosen by the search.
        skip: glob patterns over module paths of blocks to leave alone.
        transitions: also rewrite width-changing blocks. ``None`` (not given) means
            ``False``, except that a budget search may try ``True`` when ``False``
            cannot meet the target.
        rule: ``"paper"`` or ``"compact"`` (:mod:`mgic_transform.hierarchy`).
        target_params, target_flops: a budget, as a fraction of the original's
            parameters or FLOPs (at most one; not with explicit sizes).
        leaf_modules: module classes or path patterns the tracer keeps whole.
        concrete_args: ``forward()`` arguments fixed for tracing.
        init: ``"scratch"``, ``"inherit"`` (Galerkin products of the trained weights) or
            ``"calibrate"`` (inherit, then fit every block to the original on calibration data).
        checkpoint: activation checkpointing in every MGIC block.
        block_sizes: per-block ``(pattern, group_size, coarsest_width)``: a block whose path
            matches a pattern (first match wins) uses those sizes instead of the global ones.
            The budget search fills it with one exact path per block.
        calibration_steps: with ``init="calibrate"``, optimizer steps per block (``None``: the
            default of :func:`mgic_transform.calibrate`; 0: BatchNorm statistics and the
            closed-form fit only).
    """

    group_size: Optional[int] = None
    coarsest_width: Optional[int] = None
    skip: tuple[str, ...] = ()
    transitions: Optional[bool] = None
    rule: str = "paper"
    target_params: Optional[float] = None
    target_flops: Optional[float] = None
    leaf_modules: tuple[LeafSpec, ...] = ()
    concrete_args: Optional[dict[str, Any]] = field(default=None, compare=False)
    init: str = "scratch"
    checkpoint: bool = False
    block_sizes: tuple[tuple[str, int, int], ...] = ()
    calibration_steps: Optional[int] = None

    def __post_init__(self) -> None:
        values = {
            "group_size": _int("group_size", self.group_size),
            "coarsest_width": _int("coarsest_width", self.coarsest_width),
            "skip": _patterns(self.skip),
            "transitions": _bool("transitions", self.transitions, allow_none=True),
            "target_params": _ratio("target_params", self.target_params),
            "target_flops": _ratio("target_flops", self.target_flops),
            "leaf_modules": _leaves(self.leaf_modules),
            "concrete_args": _concrete_args(self.concrete_args),
            "checkpoint": _bool("checkpoint", self.checkpoint),
            "block_sizes": _block_sizes(self.block_sizes),
            "calibration_steps": _steps(self.calibration_steps),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {', '.join(map(repr, RULES))}, got {self.rule!r}. Hint: "
                              f"rule=\"paper\" builds the paper's networks, rule=\"compact\" smaller ones.")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}. Hint: "
                              f"init=\"calibrate\" with calibration=data fits the MGIC blocks to a trained model; "
                              f"init=\"inherit\" builds them from its weights without data.")
        self._check_budget()

    def _check_budget(self) -> None:
        if self.target_params is not None and self.target_flops is not None:
            raise ConfigError("pass target_params or target_flops, not both. Hint: the search meets one budget.")
        if self.target is not None and (self.group_size is not None or self.coarsest_width is not None):
            raise ConfigError(f"target_{self.target[0]} chooses group_size and coarsest_width itself; pass either "
                              f"the sizes or the target. Hint: drop group_size/coarsest_width.")

    # ----------------------------------------------------------------- derived, never stored

    @property
    def target(self) -> Optional[tuple[str, float]]:
        """``("params" | "flops", ratio)`` when a budget was asked for, else ``None``."""
        if self.target_params is not None:
            return "params", self.target_params
        if self.target_flops is not None:
            return "flops", self.target_flops
        return None

    @property
    def sizes(self) -> tuple[int, int]:
        """The global ``(group_size, coarsest_width)`` with the defaults filled in."""
        s_g = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
        return s_g, s_g if self.coarsest_width is None else self.coarsest_width

    @property
    def rewrites_transitions(self) -> bool:
        """``transitions`` with "not given" read as ``False``."""
        return bool(self.transitions)

    def sizes_for(self, path: str, layers: tuple[str, ...] = ()) -> tuple[int, int]:
        """``(group_size, coarsest_width)`` of the block at ``path`` (its layers' paths may match too)."""
        import fnmatch

        for pattern, s_g, s_c in self.block_sizes:
            if fnmatch.fnmatchcase(path, pattern) or any(fnmatch.fnmatchcase(p, pattern) for p in layers):
                return s_g, s_c
        return self.sizes

    def replace(self, **changes: Any) -> "MGICOptions":
        """``dataclasses.replace(self, **changes)``: a new, validated object."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: classes in ``leaf_modules`` by qualified name, ``concrete_args`` by ``repr``."""
        s_g, s_c = self.sizes
        return {
            "rule": self.rule,
            "group_size": s_g,
            "coarsest_width": s_c,
            "transitions": self.rewrites_transitions,
            "skip": list(self.skip),
            "target_params": self.target_params,
            "target_flops": self.target_flops,
            "leaf_modules": [s if isinstance(s, str) else f"{s.__module__}.{s.__qualname__}" for s in self.leaf_modules],
            "concrete_args": {k: repr(v) for k, v in (self.concrete_args or {}).items()},
            "init": self.init,
            "checkpoint": self.checkpoint,
            "block_sizes": {p: [g, c] for p, g, c in self.block_sizes},
            "calibration_steps": self.calibration_steps,
        }
