"""Deployment: a transformed network made fast for inference, in one call, or saved as a compiled ``.pt2``.

An MGIC network runs ~3x the ops of the original (``benchmarks/results/op_count.md``), each
small, so in eager PyTorch on a CPU the time outside the ops (dispatch, Python module calls)
is a large share of it. Two ways remove that share without changing the math:

* :func:`optimize_for_inference` returns an inference module in the same process: every eval
  BatchNorm folded (:func:`~mgic_transform.fold_batchnorm`), the memory format chosen, and with
  ``compile=True`` the whole network compiled by ``torch.compile`` (inductor, ``dynamic=False``,
  weights frozen as constants: ``freezing=True``, which lets inductor pre-pack the convolution
  weights for oneDNN).
* :func:`export_pt2` exports the folded network with ``torch.export`` and compiles it ahead of
  time with AOTInductor into one ``.pt2`` file; :func:`load_pt2` (or plain
  ``torch._inductor.aoti_load_package``, no ``mgic_transform`` needed) loads it in any process
  and runs it without recompiling. The batch dimension stays dynamic by default.

Both never modify the model they are given, and both check the result against the eager
network on the example input before returning it (``check=True``): a compiler that computes
something else must fail loudly. Measured in ``benchmarks/deploy.py``
(``benchmarks/results/deploy.md``) and ``benchmarks/compile_inference.py``.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConfigError, InputError, first_line
from .inference import fold_batchnorm

__all__ = ["optimize_for_inference", "export_pt2", "load_pt2", "InferenceModule", "INDUCTOR_CONFIGS"]

#: Inductor settings for inference (both paths). ``freezing``: parameters become constants, so
#: inductor folds and pre-packs them (oneDNN's blocked weight layout for convolutions on CPU).
INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


class InferenceModule(nn.Module):
    """The module :func:`optimize_for_inference` returns: ``module`` run without autograd.

    Inputs with 4 (5) dimensions are converted to channels-last (3d) first when
    ``channels_last`` is set. ``module`` is the BN-folded copy (an ``OptimizedModule``
    when compiled). ``compile_seconds`` is the wall time of the first, compiling call.
    """

    def __init__(self, module: nn.Module, *, channels_last: bool, compiled: bool) -> None:
        super().__init__()
        self.module = module
        self.channels_last = channels_last
        self.compiled = compiled
        self.compile_seconds = 0.0

    def forward(self, *args: Any) -> Any:
        if self.channels_last:
            args = tuple(_channels_last(a) for a in args)
        with torch.no_grad():
            return self.module(*args)

    def extra_repr(self) -> str:
        return f"channels_last={self.channels_last}, compiled={self.compiled}"


def _channels_last(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if isinstance(t, torch.Tensor) and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


def _as_tuple(example_inputs: Inputs, what: str) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors, or an :class:`InputError` that says what to pass."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError(f"{what}: example_inputs must be a tensor or a tuple of tensors (one per positional argument "
                         f"of the model's forward), e.g. torch.randn(1, 3, 224, 224); got {type(example_inputs).__name__}")
    return inputs


def _inference_copy(model: nn.Module, fold: bool) -> nn.Module:
    """An eval-mode copy of ``model``: BN-folded (:func:`fold_batchnorm`) or a plain deep copy."""
    if not isinstance(model, nn.Module):
        raise InputError(f"expected an nn.Module (e.g. the result of mgic_transform.mgicify), got {type(model).__name__}")
    return fold_batchnorm(model) if fold else copy.deepcopy(model).eval()


def _reference(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """The eager network's output at ``inputs``, in eval mode, computed on a copy (``model`` keeps its mode)."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        return ref(*inputs)


def _check_close(got: Any, want: Any, what: str, rtol: float = 1e-3) -> None:
    """Raise if ``got`` differs from ``want`` by more than ``rtol`` of ``want``'s largest magnitude (a compiler bug)."""
    got_l, want_l = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    if len(got_l) != len(want_l):
        raise RuntimeError(f"{what}: {len(got_l)} outputs, the eager network returns {len(want_l)}")
    for g, w in zip(got_l, want_l):
        if not isinstance(w, torch.Tensor):
            continue
        scale = w.detach().abs().max().clamp_min(1e-6) if w.numel() else 1.0
        err = (g.detach().to(w.dtype) - w.detach()).abs().max() / scale if w.numel() else 0.0
        if g.shape != w.shape or float(err) > rtol:
            raise RuntimeError(f"{what}: the result differs from the eager network's (relative error {float(err):.2e}, "
                               f"shapes {tuple(g.shape)} vs {tuple(w.shape)}); please report this as a bug")


def _faster_in_channels_last(module: nn.Module, inputs: tuple[torch.Tensor, ...], rounds: int) -> bool:
    """Whether ``module`` runs clearly (>5%) faster on channels-last inputs and weights, timed on ``inputs``.

    ``rounds`` calls of each layout, interleaved (so load from other jobs hits both alike),
    after one warm-up call each; the medians are compared. Only for 4-d / 5-d inputs.
    """
    if not any(t.dim() in (4, 5) for t in inputs):
        return False
    cl_module = copy.deepcopy(module).to(memory_format=torch.channels_last)
    cl_inputs = tuple(_channels_last(t) for t in inputs)
    runs = {False: lambda: module(*inputs), True: lambda: cl_module(*cl_inputs)}
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for r in range(rounds):
            for key in ((False, True) if r % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                runs[key]()
                times[key].append(time.perf_counter() - t0)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return median[True] < 0.95 * median[False]


def _compile_options(mode: Optional[str], freezing: bool) -> dict[str, Any]:
    """``torch.compile`` options: the mode's own inductor settings plus ours (``torch.compile`` takes one or the other)."""
    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    options.update(INDUCTOR_CONFIGS)
    options["freezing"] = freezing
    return options


def optimize_for_inference(model: nn.Module, example_inputs: Inputs, *, compile: bool = False,
                           channels_last: Optional[bool] = None, fold: bool = True, mode: Optional[str] = None,
                           freezing: bool = True, timing_rounds: int = 5, check: bool = True) -> InferenceModule:
    """An inference-only copy of ``model`` that computes what its eval mode computes, faster.

    Args:
        model: the result of :func:`~mgic_transform.mgicify` (or any traceable model: the
            original network gets the same treatment, for a fair comparison). Not modified.
        example_inputs: a tensor or a tuple of tensors, as ``model(*example_inputs)`` takes them;
            used to choose the memory format, to compile, and to check the result.
        compile: also ``torch.compile`` the network (inductor, ``dynamic=False``: one compile
            per input shape; the first call with the example inputs is made here, so the
            returned module is ready). ``freezing=True`` (default) makes the weights constants.
        channels_last: run in channels-last (``True``) or NCHW (``False``). ``None`` (default):
            eager, time ``timing_rounds`` interleaved calls of both layouts on the example inputs
            and take channels-last only if it is >5% faster (a decision for the example's batch
            size); compiled, NCHW without timing (timing both would compile twice; channels-last
            was slower for MGIC in every eager ResNet-50 row of ``results/speed_channels_last.md``
            and is not measured compiled: pass ``True`` to try it).
        fold: fold every eval BatchNorm into the convolution before it (exact up to rounding).
        mode: ``torch.compile``'s mode (its inductor settings are merged with ``freezing``).
        check: compare the result with ``model`` in eval mode on the example inputs
            (relative error < 1e-3 of the largest output) and raise ``RuntimeError`` if it differs.

    Returns:
        an :class:`InferenceModule`: call it like the model; it runs under ``torch.no_grad()``.

    Raises:
        InputError: ``example_inputs`` is not a tensor or tuple of tensors, or ``model`` is not a module.
        TraceError: ``fold=True`` on a model ``torch.fx`` cannot trace (the message names the fix).
    """
    inputs = _as_tuple(example_inputs, "optimize_for_inference")
    base = _inference_copy(model, fold)
    if channels_last is None:
        channels_last = False if compile else _faster_in_channels_last(base, inputs, timing_rounds)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    body = torch.compile(base, dynamic=False, options=_compile_options(mode, freezing)) if compile else base
    out = InferenceModule(body, channels_last=bool(channels_last), compiled=compile)
    t0 = time.perf_counter()
    got = out(*inputs)  # compiles here when compile=True
    out.compile_seconds = time.perf_counter() - t0 if compile else 0.0
    if check:
        _check_close(got, _reference(model, inputs), "optimize_for_inference")
    return out


def _export_args(inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> tuple[tuple[torch.Tensor, ...], Any]:
    """The arguments and ``dynamic_shapes`` for ``torch.export``: dim 0 of every input one shared ``Dim("batch")``.

    An example batch of 1 is repeated to 2: export specialises a dimension whose example
    size is 0 or 1 to that size, which would fix the batch of the ``.pt2`` to 1.
    """
    if not dynamic_batch:
        return inputs, None
    sizes = {t.shape[0] if t.dim() else None for t in inputs}
    if len(sizes) != 1 or None in sizes:
        raise InputError("export_pt2(dynamic_batch=True) needs dimension 0 of every input to be the batch, of one size; "
                         f"got shapes {[tuple(t.shape) for t in inputs]}. Pass dynamic_batch=False to export fixed shapes.")
    if sizes == {1}:
        inputs = tuple(t.expand(2, *t.shape[1:]).clone() for t in inputs)
    batch = torch.export.Dim("batch", min=1)
    return inputs, tuple({0: batch} for _ in inputs)


def export_pt2(model: nn.Module, example_inputs: Inputs, path: Union[str, os.PathLike], *, dynamic_batch: bool = True,
               fold: bool = True, inductor_configs: Optional[dict[str, Any]] = None, check: bool = True) -> Path:
    """Compile ``model`` ahead of time (``torch.export`` + AOTInductor) into a ``.pt2`` file that runs without recompiling.

    The model is BN-folded (``fold=True``) and exported in eval mode, with the batch
    dimension dynamic (``dynamic_batch=True``: any batch size from 1 up runs from the same
    file). Load it with :func:`load_pt2` or, without this package,
    ``torch._inductor.aoti_load_package(path)``; the loading process needs the same torch
    version and a CPU of the same kind (kernels are compiled for this machine). The CPU kernels
    use the thread count of the exporting process (``torch.get_num_threads()``): export with the
    thread count you deploy with, or pass ``inductor_configs={"cpp.dynamic_threads": True}``
    (threads read at run time, slightly slower on one thread). Compiling takes ~40 s for a
    toy network and ~2 minutes per ResNet-50 on 2 busy cores.

    Args:
        model: the transformed network (or any exportable model). Not modified.
        example_inputs: a tensor or a tuple of tensors, as ``model(*example_inputs)`` takes them.
        path: the file to write; must end in ``.pt2``; missing parent folders are created.
        dynamic_batch: keep dimension 0 (the batch, shared by every input) dynamic.
        fold: fold every eval BatchNorm into the convolution before it first.
        inductor_configs: inductor settings, on top of :data:`INDUCTOR_CONFIGS` (``freezing``).
        check: load the file back and compare its output with ``model``'s (eval) on the example
            inputs; raises ``RuntimeError`` if they differ (relative error > 1e-3).

    Returns:
        the path of the written ``.pt2`` file.

    Raises:
        ConfigError: ``path`` does not end in ``.pt2``.
        InputError: bad ``example_inputs``, or ``torch.export`` could not capture the model
            (the message says what it hit and what to try).
    """
    inputs = _as_tuple(example_inputs, "export_pt2")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ConfigError(f"export_pt2: the file name must end in .pt2 (AOTInductor's package format), got {str(path)!r}")
    base = _inference_copy(model, fold)
    args, dynamic_shapes = _export_args(inputs, dynamic_batch)
    try:
        with torch.no_grad():
            program = torch.export.export(base, args, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - every capture failure is reported with what to try
        hint = (" It is about the batch dimension: try dynamic_batch=False." if "batch" in str(exc) else
                " Data-dependent Python control flow in forward() cannot be exported as it is (torch.export's "
                "documentation: torch.cond, torch._check).")
        raise InputError(f"torch.export could not capture the model: {first_line(exc)}.{hint}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = {**INDUCTOR_CONFIGS, **(inductor_configs or {})}
    written = Path(torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path),
                                                            inductor_configs=configs))
    if check:
        _check_close(load_pt2(written)(*inputs), _reference(model, inputs), "export_pt2")
    return written


def load_pt2(path: Union[str, os.PathLike]) -> Any:
    """Load a ``.pt2`` written by :func:`export_pt2`: a callable taking the model's inputs (no recompiling).

    The same as ``torch._inductor.aoti_load_package(path)``, with errors that say what to do.
    Call it under ``torch.no_grad()`` or not: the compiled model records no autograd graph.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"load_pt2: no file {str(path)!r}; write one with mgic_transform.export_pt2(model, "
                         "example_inputs, path)")
    try:
        return torch._inductor.aoti_load_package(os.fspath(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"load_pt2: {str(path)!r} is not a loadable AOTInductor package ({first_line(exc)}); it must "
                         "come from export_pt2 with this torch version on this kind of machine: export it again") from exc
