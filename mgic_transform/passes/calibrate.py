"""Fit every MGIC block to the trained network it replaces, on a few unlabeled inputs (``calibrate``).

``mgicify(trained, x, init="inherit")`` builds every level of an MGIC block from
the trained weights (Galerkin products, :mod:`mgic_transform.passes.inherit`),
but the finest level keeps only ``1/G_0`` of each dense weight and the trained
BatchNorm statistics no longer describe what the levels compute: the block's
output is far from the trained block's (relative error 0.66-0.85 on MNIST-1D
and digits) and the network starts at chance. Compressing a trained network
without retraining it is done, in the literature, by fitting each compressed
piece to the original's own activations on a small calibration set (He et al.
2017 and ThiNet for pruned layers; AdaRound, BRECQ for quantised blocks; OBC,
SparseGPT). An MGIC block is an ideal unit for this: a self-contained module
with a known input and a known target output. This pass does it::

    for block k = 1 .. K, in graph order:
        X_k = the transformed network's input to block k    (blocks 1 .. k-1 already fitted)
        Y_k = the trained network's activation at the exit of the block k replaced, same batch
        fit block k so that MGIC_k(X_k) ~ Y_k

The order is BRECQ's: the input comes from the *transformed* network, so block k
learns to correct what blocks ``1 .. k-1`` still get wrong instead of errors piling
up, and the target from the *original*, so nothing drifts from the trained model.

How one block is fitted (each choice measured in ``benchmarks/compress_trained.py``)
    0. *Closed form for the finest level* (``least_squares=True``). The finest level is
       the block itself with grouped layers, and with ``N_0 = 0`` it is the whole MGIC
       block at the start. Each of its conv/linear layers, in graph order, is solved
       in closed form against the output of the same layer of the original on the same
       samples (He et al. 2017's channel reconstruction, per group: ridge-regularised
       least squares over ``(in / G) * kernel`` features, inputs taken from the level
       as it runs, so earlier solved layers are accounted for). The finest level's
       norms are left as they are: the solved layers were fitted through them.
    1. *BatchNorm statistics.* Every other BatchNorm of the block (the coarse levels'
       and the correction norms ``N_j``) gets running statistics re-estimated on
       ``X_k`` (train-mode forwards, cumulative average): the inherited ones describe
       the trained layers, not the levels' block-diagonal and restricted ones.
    2. *Adam on the block's output*, in eval mode (each BatchNorm a fixed per-channel
       affine map), minimising ``||MGIC_k(x) - y||^2 / mean ||y||^2`` over random
       mini-batches of the cached set, ``steps`` steps with a cosine-decayed learning
       rate (peak 1e-2; 3e-3 and 3e-2 fitted worse in an exploratory sweep on seed 0).
       Every parameter of the block learns: the levels, ``R_j``, ``P_j``, and ``N_j``,
       whose weight starts at 0 under ``init="inherit"`` (its gradient is not zero:
       the normalised input is not), which switches the coarse corrections on as far
       as they help.

Then the blocks together, and the statistics
    3. *The network's output* (``network_steps``). Block targets weigh every channel
       of every block alike, whatever it does to the prediction. After the blocks,
       Adam fits all MGIC blocks' parameters at once (every other layer keeps the
       original's weights) to the original's *output* on the calibration inputs
       (``sum_i ||out_i - target_i||^2 / mean ||target_i||^2`` over the model's
       floating-point outputs, eval mode, lr 1e-3 warmed up, then cosine-decayed): label-free logit
       matching, as in distillation. Kept only if it lowered that error on the
       calibration set (else the blocks are put back and the plan's note says so).
       Each block's ``BlockFit.error_after`` is then measured again, in the final
       network.
    4. *Statistics refit*, once, over all blocks in one pass. Every norm's running
       statistics are set to the statistics of its input as the fitted network runs,
       and its affine weight/bias compensated (``w' = w s'/s``,
       ``b' = b + w (m' - m)/s``, ``s = sqrt(var + eps)``): the eval-mode function is
       exactly the fitted one, and a train-mode fine-tuning that follows normalises
       with batch statistics close to the running ones, so it starts from the
       calibrated network instead of losing it at the first step. Done last, not
       per block, so that every Adam step works on affine maps of their natural
       scale (a compensated ``w s'/s`` can be far from it).

Memory
    The calibration inputs are read once (at most ``max_samples`` samples) and kept.
    Then one block at a time: the block's inputs ``X_k`` and targets ``Y_k`` for the
    whole calibration set are cached, ``max_samples x (c_in + c_out) x spatial`` values
    (1,024 samples of a 64-channel 32x32 block: 2 x 256 MiB in float32; ResNet-50's
    ``layer1`` at 224x224: 2 x 3.1 GiB, so use fewer samples there), plus, for the
    closed form, the original's output of every solved layer (one more such tensor
    per conv/linear layer of the block), all freed before the next block.
    Activations are computed batch by batch (``batch_size``), by running the
    transformed network up to block ``k``'s input and the original up to block
    ``k``'s exit: never the whole set's activations of every block. The network
    stage keeps the original's outputs for the calibration set (for a classifier,
    ``max_samples x classes`` values) and one copy of the blocks' weights.

What is not touched
    ``original`` never changes: it is run as a private copy of its module tree
    (buffers cloned, hooks removed, eval mode) that shares its parameters and
    computes without autograd. The global RNG state is unchanged (mini-batches are
    drawn from a private generator; ``seed`` fixes it, so a second call with the
    same seed gives bit-identical weights on the same device).

The result is recorded per block on the plan: ``BlockDecision.fit`` is a
:class:`~mgic_transform.plan.BlockFit` (error before and after, steps, samples, seconds).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from .._modcopy import copy_structure
from ..errors import InputError, MGICError
from ..layers import inheritance_kind
from ..nn.mgic_block import MGICBlock
from ..plan import BlockDecision, BlockFit, MGICPlan, attach_plan, plan_of
from ..tracing import eliminate_dead_code, trace
from .inherit import _prefix as _inherit_prefix

__all__ = ["calibrate", "block_errors", "CalibrationData", "refit_statistics", "DEFAULT_STEPS", "DEFAULT_LR",
           "DEFAULT_NETWORK_STEPS", "DEFAULT_NETWORK_LR", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_SAMPLES"]

DEFAULT_STEPS = 300  # Adam steps per block
DEFAULT_LR = 1e-2  # peak learning rate of the per-block Adam fit (cosine-decayed to 0); 3e-3 and 3e-2 fitted worse
DEFAULT_BATCH_SIZE = 64  # samples per forward while caching and per Adam step
DEFAULT_MAX_SAMPLES = 1024  # calibration samples read (and what mgicify reads of its calibration data)
DEFAULT_NETWORK_STEPS = 300  # Adam steps on the network's output after the blocks
DEFAULT_NETWORK_LR = 1e-3  # peak learning rate of that stage

Progress = Union[bool, None, Callable[[str], None]]


# ----------------------------------------------------------------------------- reading the calibration data


class CalibrationData:
    """The calibration inputs, read once: one tensor per model input, the samples along dim 0.

    Built by :meth:`read` from what a user passes to :func:`calibrate` (a tensor, an
    iterable of input batches, or of ``(input, target)`` pairs as a DataLoader yields
    them); :meth:`batches` hands them out ``batch_size`` samples at a time.
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return self.inputs[0].shape[0]

    def batches(self, batch_size: int) -> Iterable[tuple[torch.Tensor, ...]]:
        for i in range(0, len(self), batch_size):
            yield tuple(t[i:i + batch_size] for t in self.inputs)

    @classmethod
    def read(cls, data: Any, n_inputs: int, example: Sequence[torch.Tensor], max_samples: int,
             device: torch.device) -> "CalibrationData":
        """Check and collect at most ``max_samples`` samples of ``data``; :class:`InputError` if unusable."""
        if isinstance(data, torch.Tensor):
            data = [data]
        elif isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
            raise InputError(f"calibration data must be a tensor or an iterable of batches (a DataLoader), got "
                             f"{type(data).__name__}. Hint: pass train_inputs[:1024], or a DataLoader over the "
                             f"training set.")
        parts: list[tuple[torch.Tensor, ...]] = []
        count = 0
        for k, batch in enumerate(data):
            inputs = _batch_inputs(batch, n_inputs, k)
            _check_like_example(inputs, example, k)
            take = min(inputs[0].shape[0], max_samples - count)
            parts.append(tuple(t[:take].detach().to(device) for t in inputs))
            count += take
            if count >= max_samples:
                break
        if count == 0:
            raise InputError("the calibration data holds no sample. Hint: pass a non-empty tensor or DataLoader of "
                             "training inputs (a few hundred to 1,024 samples).")
        return cls(tuple(torch.cat([p[i] for p in parts]) for i in range(n_inputs)))


def _batch_inputs(batch: Any, n_inputs: int, k: int) -> tuple[torch.Tensor, ...]:
    """The model inputs of one batch: the tensor itself, or the first ``n_inputs`` items of a tuple/list."""
    if isinstance(batch, torch.Tensor):
        items: tuple = (batch,)
    elif isinstance(batch, (tuple, list)):
        items = tuple(batch)
    else:
        raise InputError(f"calibration batch {k} is a {type(batch).__name__}; expected a tensor or a tuple "
                         f"(input, target) as a DataLoader yields. Hint: pass a DataLoader over a TensorDataset, "
                         f"or a tensor of inputs.")
    inputs = items[:n_inputs]
    if len(inputs) < n_inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError(f"calibration batch {k} should start with the model's {n_inputs} input tensor(s), got "
                         f"{[type(t).__name__ for t in items]}. Hint: each batch is (input, ...) with the input "
                         f"first, as mgicify's example_inputs.")
    sizes = {t.shape[0] if t.dim() else None for t in inputs}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise InputError(f"calibration batch {k}: the inputs must hold the same number (>0) of samples along dim 0, "
                         f"got shapes {[tuple(t.shape) for t in inputs]}.")
    return inputs


def _check_like_example(inputs: Sequence[torch.Tensor], example: Sequence[torch.Tensor], k: int) -> None:
    for i, (t, e) in enumerate(zip(inputs, example)):
        if t.dim() != e.dim() or (t.dim() > 1 and t.shape[1] != e.shape[1]) or t.dtype != e.dtype:
            raise InputError(f"calibration batch {k}, input {i}: shape {tuple(t.shape)} ({t.dtype}) does not match "
                             f"the example input mgicify was given, {tuple(e.shape)} ({e.dtype}). Hint: pass batches "
                             f"of the model's real inputs (same dimensions, channels and dtype).")


# ----------------------------------------------------------------------------- running a graph up to a node


def _prefix(gm: torch.fx.GraphModule, outputs: Sequence[str], *, stop_before: Optional[str] = None
            ) -> torch.fx.GraphModule:
    """A GraphModule that runs ``gm``'s graph only as far as needed and returns the values of ``outputs``.

    Every node after the last wanted one is dropped (also in-place ones, which
    could overwrite a wanted value), then dead code (in-place writes kept).
    ``stop_before`` names a node that must not run (a wanted value is its input).
    Shares ``gm``'s submodules.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    wanted = set(outputs)
    for node in gm.graph.nodes:
        if node.op == "output" or node.name == stop_before or not wanted - {n.name for n in env}:
            break
        env[node] = graph.node_copy(node, lambda a: env[a])
    by_name = {n.name: v for n, v in env.items()}
    graph.output(tuple(by_name[name] for name in outputs))
    pm = torch.fx.GraphModule(gm, graph)
    eliminate_dead_code(pm)
    pm.recompile()
    return pm


def _private_original(original: nn.Module, plan: MGICPlan) -> torch.fx.GraphModule:
    """``original`` traced as ``mgicify`` traced it, on a private eval-mode copy that shares its parameters.

    The copy is traced in the model's own mode (so that a forward that branches on
    ``self.training`` gives the graph ``mgicify`` saw, node names included), then put
    in eval mode and stripped of hooks, which must not fire on the user's behalf.
    """
    options = getattr(plan, "options", None)  # MGICOptions (a plan of version 0.1 has none: the defaults)
    leaf_modules = tuple(getattr(options, "leaf_modules", ()) or ())
    concrete_args = getattr(options, "concrete_args", None)
    work = copy_structure(original, lambda t: t if isinstance(t, nn.Parameter) else t.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mgicify already warned about what the trace keeps whole
        traced = trace(work, leaf_modules=leaf_modules, concrete_args=concrete_args)
    for m in [*work.modules(), *traced.modules()]:
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            getattr(m, name).clear()  # the copy's own dicts (copy_structure copies them)
    return traced.eval()


# ----------------------------------------------------------------------------- one block's data


@dataclasses.dataclass
class _BlockData:
    """One block's cached calibration inputs ``x`` (transformed network) and targets ``y`` (original network)."""

    x: torch.Tensor
    y: torch.Tensor
    inner: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # original node name -> its values

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


def _mgic_node(gm: torch.fx.GraphModule, module: str) -> torch.fx.Node:
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) == module:
            return node
    raise MGICError(f"the transformed network has no call of its MGIC block {module!r} (was its graph edited after "
                    f"mgicify?). Hint: calibrate the GraphModule mgicify returned.")


@torch.no_grad()
def _cache_block(gm: torch.fx.GraphModule, original: torch.fx.GraphModule, d: BlockDecision,
                 data: CalibrationData, batch_size: int, inner: Sequence[str] = (), *,
                 inputs_from_original: bool = False, check: Optional[nn.Module] = None) -> _BlockData:
    """Run the transformed network to block ``d``'s input and the original to its exit, batch by batch.

    ``inner`` names nodes inside the original block whose values are cached too
    (the layer targets of :func:`_least_squares_finest`). ``inputs_from_original``:
    the block's inputs are the original's activations at the block's entry instead
    (every block then measured on its own, as :func:`block_errors` does). ``check``:
    the module whose output shape is checked against the target's (default: the block).
    """
    exit_name = d.nodes[-1]
    if not any(n.name == exit_name for n in original.graph.nodes):
        raise InputError(f"the original model has no node {exit_name!r}, the exit of block {d.path!r} when mgicify "
                         f"traced it. Hint: pass calibrate() the same model (same code, leaf_modules and "
                         f"concrete_args) that mgicify transformed.")
    node = _mgic_node(gm, d.module)
    wanted = [exit_name, *inner, *([_entry_name(original, d)] if inputs_from_original else [])]
    to_input = None if inputs_from_original else _prefix(gm, [node.args[0].name], stop_before=node.name)
    to_exit = _prefix(original, wanted)
    values: list[list[torch.Tensor]] = [[] for _ in range(2 + len(inner))]  # the exit, the inner nodes, the input
    for batch in data.batches(batch_size):
        outs = [v.detach().clone() for v in to_exit(*(t.clone() for t in batch))]  # clones: a graph may write into
        if to_input is not None:                                                   # its input in place
            outs.append(to_input(*(t.clone() for t in batch))[0].detach().clone())
        for store, value in zip(values, outs):
            store.append(value)
    y, x = torch.cat(values[0]), torch.cat(values[-1])
    block = gm.get_submodule(d.module) if check is None else check
    training = block.training
    out_shape = block.eval()(x[:1]).shape
    block.train(training)
    if out_shape[1:] != y.shape[1:]:
        raise InputError(f"block {d.path!r}: the MGIC block returns {tuple(out_shape[1:])} per sample but the "
                         f"original's activation at {exit_name!r} is {tuple(y.shape[1:])}. Hint: pass calibrate() "
                         f"the model mgicify transformed.")
    return _BlockData(x, y, {name: torch.cat(v) for name, v in zip(inner, values[1:1 + len(inner)])})


def _entry_name(original: torch.fx.GraphModule, d: BlockDecision) -> str:
    """The node of the original graph whose value enters block ``d`` (its one input that is not a constant)."""
    inside = set(d.nodes)
    entries = {a.name for n in original.graph.nodes if n.name in inside for a in n.all_input_nodes
               if a.name not in inside and a.op != "get_attr"}
    if len(entries) != 1:
        raise MGICError(f"block {d.path!r} has {len(entries)} inputs in the original graph ({sorted(entries)}), not "
                        f"one. Hint: measure it in the transformed network (mt.calibrate).")
    return entries.pop()


@torch.no_grad()
def _relative_error(block: nn.Module, data: _BlockData, batch_size: int) -> float:
    """``||block(x) - y|| / ||y||`` over the whole cached set, in the block's current mode."""
    diff = total = 0.0
    for x, y in data.batches(batch_size):
        out = block(x)
        diff += (out - y).double().pow(2).sum().item()
        total += y.double().pow(2).sum().item()
    return math.sqrt(diff / total) if total > 0 else math.sqrt(diff)


# ----------------------------------------------------------------------------- BatchNorm statistics


def _running_norms(block: nn.Module) -> list[nn.Module]:
    """The norms of ``block`` that keep running statistics (BatchNorm, tracked InstanceNorm), by duck typing."""
    return [m for m in block.modules()
            if getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None
            and hasattr(m, "reset_running_stats")]


@torch.no_grad()
def _estimate_statistics(block: nn.Module, data: _BlockData, batch_size: int, keep: Iterable[nn.Module] = ()) -> None:
    """Re-estimate the running statistics of ``block``'s norms (not those in ``keep``) on the cached inputs.

    A cumulative average over the batches. Only the norms run in train mode
    (dropout and the like stay in eval mode); ``num_batches_tracked``, ``momentum``
    and the flags are put back as they were.
    """
    keep = set(keep)
    norms = [m for m in _running_norms(block) if m not in keep]
    saved = [(m, m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        for x, _ in data.batches(batch_size):
            block(x)
    finally:
        for m, training, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
            m.train(training)


@torch.no_grad()
def _input_statistics(run: Callable[[], None], norms: Sequence[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The running statistics each norm of ``norms`` would estimate from the inputs it gets while ``run()`` runs.

    The model runs unchanged (in its current mode); a private train-mode copy of
    every norm sees the same input (a forward pre-hook) and keeps a cumulative
    average over the batches, so any norm with running statistics is handled the
    way it handles them itself (channels-last, instance norms).
    """
    probes = []
    for m in norms:
        probe = copy.deepcopy(m)
        probe.reset_running_stats()
        probe.momentum = None
        probes.append(probe.train())

    def feed(probe: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            probe(args[0])
        return hook

    hooks = [m.register_forward_pre_hook(feed(probe)) for m, probe in zip(norms, probes)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return [(p.running_mean, p.running_var) for p in probes]


@torch.no_grad()
def _refit(run: Callable[[], None], modules: Iterable[nn.Module]) -> None:
    """Every affine running-statistics norm inside ``modules`` refitted to its inputs while ``run()`` runs, compensated.

    An eval-mode norm computes ``w (x - m) / s + b`` with ``s = sqrt(var + eps)``.
    With new statistics ``m', s'``, the weight ``w' = w s' / s`` and bias
    ``b' = b + w (m' - m) / s`` give the same function. Because every norm's
    output is unchanged, so is every norm's input: the new statistics are those
    of each norm's input as the model runs now (eval mode), all measured in one
    pass. A train-mode step that follows then normalises with batch statistics
    close to the running ones, i.e. it starts from the fitted function. A norm
    without an affine map keeps its statistics.
    """
    norms = [m for module in modules for m in _running_norms(module) if getattr(m, "weight", None) is not None
             and getattr(m, "bias", None) is not None]
    for m, (mean, var) in zip(norms, _input_statistics(run, norms)):
        std, new_std = (m.running_var + m.eps).sqrt(), (var + m.eps).sqrt()
        m.bias.add_(m.weight * (mean - m.running_mean) / std)
        m.weight.mul_(new_std / std)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


def refit_statistics(block: nn.Module, data: _BlockData, batch_size: int) -> None:
    """:func:`_refit` of ``block``'s norms on its cached inputs: the eval-mode block is unchanged."""
    _refit(lambda: [block(x) for x, _ in data.batches(batch_size)], [block])


# ----------------------------------------------------------------------------- closed form: the finest level


def _finest_layers(block: MGICBlock, d: BlockDecision, original: torch.fx.GraphModule) -> list[tuple[nn.Module, str]]:
    """The conv/linear layers of the finest level, in graph order, each with the original node computing its target.

    A layer qualifies when the original block calls its counterpart (same relative
    module path) exactly once, with the same input and output widths: the finest
    level is the block itself with grouped layers, so that node's output is what
    the layer should compute. Width-changing blocks (their levels read the
    connector) have no such counterparts.
    """
    if block.connector is not None:
        return []
    level = block.levels[0]
    prefix = _inherit_prefix(level, d.layers, original)
    if prefix is None:
        return []
    inside = set(d.nodes)
    calls: dict[str, list[torch.fx.Node]] = {}
    for n in original.graph.nodes:
        if n.op == "call_module" and n.name in inside:
            calls.setdefault(str(n.target), []).append(n)
    found = []
    for n in level.graph.nodes:
        if n.op != "call_module":
            continue
        new = level.get_submodule(str(n.target))
        full = f"{prefix}.{n.target}" if prefix else str(n.target)
        nodes = calls.get(full, [])
        if _solvable(new) and len(nodes) == 1 and _io_widths(new) == _io_widths(original.get_submodule(full)):
            found.append((new, nodes[0].name))
    return found


def _solvable(module: nn.Module) -> bool:
    kind = inheritance_kind(module)
    return kind == "linear" or (kind == "conv" and not getattr(module, "transposed", False))


def _io_widths(module: nn.Module) -> tuple[int, int]:
    if inheritance_kind(module) == "linear":
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(rows, groups, features)``: one row per output position (im2col for a conv)."""
    if inheritance_kind(module) == "linear":
        g = module.groups if hasattr(module, "groups") else 1
        return a.reshape(-1, g, a.shape[-1] // g)
    dims, g = len(module.kernel_size), module.groups
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    a = nn.functional.pad(a, module._reversed_padding_repeated_twice, mode=mode)
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        a = a.unfold(2 + i, (k - 1) * dil + 1, s)[..., ::dil]  # (N, C, out..., k...) after every dim
    n, c = a.shape[:2]
    out = a.shape[2:2 + dims]
    a = a.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # (N, out..., C, k...)
    return a.reshape(n * math.prod(out), g, (c // g) * math.prod(module.kernel_size))


def _outputs(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A layer's output (or target) as ``(rows, groups, out_features / groups)``, rows as in :func:`_patches`."""
    g = getattr(module, "groups", 1)
    if inheritance_kind(module) == "linear":
        return t.reshape(-1, g, t.shape[-1] // g)
    return t.movedim(1, -1).reshape(-1, g, t.shape[1] // g)


def _set_solution(module: nn.Module, w: torch.Tensor) -> None:
    """Write the solution ``(groups, features [+ 1 for the bias], out / groups)`` into the layer."""
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.copy_(w[:, -1, :].reshape(-1))
        w = w[:, :-1, :]
    module.weight.copy_(w.transpose(1, 2).reshape(module.weight.shape))  # (G, out/G, features): conv/Linear layout


@torch.no_grad()
def _solve_layer(block: MGICBlock, module: nn.Module, target: torch.Tensor, data: _BlockData, batch_size: int,
                 ridge: float) -> None:
    """Least squares for one layer: its own inputs in the running block against the original layer's outputs."""
    seen: dict[str, torch.Tensor] = {}
    hook = module.register_forward_hook(lambda m, args, out: seen.__setitem__("a", args[0]))
    gram = cross = None
    try:
        for i in range(0, len(data), batch_size):
            block(data.x[i:i + batch_size])
            a = _patches(module, seen.pop("a")).double()
            if getattr(module, "bias", None) is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            t = _outputs(module, target[i:i + batch_size]).double()
            g_part, c_part = torch.einsum("rgf,rgh->gfh", a, a), torch.einsum("rgf,rgo->gfo", a, t)
            gram, cross = (g_part, c_part) if gram is None else (gram + g_part, cross + c_part)
    finally:
        hook.remove()
    scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # per group
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + ridge * scale[:, None, None] * eye, cross)
    _set_solution(module, solution.to(module.weight.dtype))


def _least_squares_finest(block: MGICBlock, data: _BlockData, layers: Sequence[tuple[nn.Module, str]],
                          batch_size: int, ridge: float = 1e-4) -> None:
    """Every conv/linear layer of the finest level, in order, fitted in closed form to the original's layer.

    He et al. 2017's channel reconstruction, per group: the grouped layer that best
    maps the inputs it really receives (earlier layers already solved) to the
    original layer's outputs on the same samples. Each group is an independent
    ridge-regularised least-squares problem over ``(in / G) * kernel`` features.
    """
    for module, node in layers:
        _solve_layer(block, module, data.inner[node], data, batch_size, ridge)


# ----------------------------------------------------------------------------- fitting one block


def _fit_adam(block: nn.Module, data: _BlockData, *, steps: int, lr: float, batch_size: int,
              generator: torch.Generator) -> int:
    """Adam on ``||block(x) - y||^2 / mean ||y||^2`` over random mini-batches, cosine-decayed lr; returns the steps."""
    params = [p for p in block.parameters() if p.requires_grad]
    if steps <= 0 or not params:
        return 0
    scale = data.y.double().pow(2).mean().item() or 1.0
    return _adam(params, lambda idx: (block(data.x[idx]) - data.y[idx]).pow(2).mean() / scale, steps=steps, lr=lr,
                 warmup=1, samples=len(data), batch_size=batch_size, generator=generator, device=data.x.device)


def _adam(params: list[torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor], *, steps: int, lr: float,
          warmup: int, samples: int, batch_size: int, generator: torch.Generator, device: torch.device) -> int:
    """``steps`` Adam steps on ``loss_of(indices)`` over random mini-batches of ``samples``; returns ``steps``.

    The learning rate rises linearly over ``warmup`` steps, then decays by a cosine. The
    indices come from ``generator`` (on the CPU, so the draws are the same on every device).
    The gradients are dropped at the end.
    """
    opt = torch.optim.Adam(params, lr=lr, foreach=True)  # one kernel per op for all tensors: fewer, larger ops
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps)))
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, samples, (min(batch_size, samples),), generator=generator, device="cpu")
            loss = loss_of(idx.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for p in params:
        p.grad = None
    return steps


def _fit_block(block: MGICBlock, data: _BlockData, *, steps: int, lr: float, batch_size: int,
               generator: torch.Generator, layers: Sequence[tuple[nn.Module, str]] = ()) -> int:
    """Least squares for ``layers``, statistics, Adam in eval mode (steps 0-2); returns the Adam steps."""
    checkpointed = getattr(block, "checkpoint", False)
    block.checkpoint = False  # the fit's backward needs no recomputation: one block, one mini-batch
    try:
        _least_squares_finest(block, data, layers, batch_size)
        # the solved layers were fitted through the finest level's norms as they are: keep those
        _estimate_statistics(block, data, batch_size, keep=_running_norms(block.levels[0]) if layers else ())
        return _fit_adam(block, data, steps=steps, lr=lr, batch_size=batch_size, generator=generator)
    finally:
        block.checkpoint = checkpointed


# ----------------------------------------------------------------------------- the network's output


def _float_outputs(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, or any nesting of tuples, lists and dicts)."""
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def _network_targets(original: torch.fx.GraphModule, calib: CalibrationData, batch_size: int
                     ) -> list[torch.Tensor]:
    """The original's floating-point outputs on every calibration sample (those with one row per sample)."""
    parts = []
    for batch in calib.batches(batch_size):
        outs = _float_outputs(original(*(t.clone() for t in batch)))
        parts.append([o.detach().clone() for o in outs if o.dim() and o.shape[0] == batch[0].shape[0]])
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))] if parts and parts[0] else []


def _network_loss(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  scales: Sequence[float]) -> torch.Tensor:
    outs = [o for o in _float_outputs(gm(*inputs)) if o.dim() and o.shape[0] == inputs[0].shape[0]]
    if [o.shape for o in outs] != [t.shape for t in targets]:
        raise MGICError(f"the transformed network returns outputs of shapes {[tuple(o.shape) for o in outs]}, the "
                        f"original {[tuple(t.shape) for t in targets]}. Hint: calibrate the GraphModule mgicify "
                        f"returned for this model, with network_steps=0 to fit the blocks only.")
    return sum((o - t).pow(2).mean() / s for o, t, s in zip(outs, targets, scales))


@torch.no_grad()
def _network_error(gm: torch.fx.GraphModule, calib: CalibrationData, targets: Sequence[torch.Tensor],
                   batch_size: int) -> float:
    """``||gm(x) - original(x)|| / ||original(x)||`` over the calibration set, every output tensor together."""
    diff = total = 0.0
    for i, batch in enumerate(calib.batches(batch_size)):
        part = [t[i * batch_size:(i + 1) * batch_size] for t in targets]
        outs = [o for o in _float_outputs(gm(*batch)) if o.dim() and o.shape[0] == batch[0].shape[0]]
        diff += sum((o - t).double().pow(2).sum().item() for o, t in zip(outs, part))
        total += sum(t.double().pow(2).sum().item() for t in part)
    return math.sqrt(diff / total) if total > 0 else math.sqrt(diff)


def _fit_network(gm: torch.fx.GraphModule, blocks: Sequence[nn.Module], calib: CalibrationData,
                 targets: Sequence[torch.Tensor], *, steps: int, lr: float, batch_size: int,
                 generator: torch.Generator) -> int:
    """Adam on the network's output error, the MGIC blocks' parameters only, in eval mode.

    ``sum_i ||out_i - target_i||^2 / mean ||target_i||^2`` over random mini-batches, lr
    warmed up over the first tenth of the steps, then cosine-decayed; every other layer
    keeps the original's weights. Returns the steps taken.
    """
    params = [p for b in blocks for p in b.parameters() if p.requires_grad]
    if steps <= 0 or not params or not targets:
        return 0
    scales = [t.double().pow(2).mean().item() or 1.0 for t in targets]
    return _adam(params, lambda idx: _network_loss(gm, [t[idx] for t in calib.inputs], [t[idx] for t in targets],
                                                   scales),
                 steps=steps, lr=lr, warmup=max(1, steps // 10),  # Adam's first steps move every weight by ~lr: ramp
                 samples=len(calib), batch_size=batch_size, generator=generator, device=targets[0].device)


# ----------------------------------------------------------------------------- the pass


def _plan_and_inputs(gm: Any) -> tuple[MGICPlan, tuple[torch.Tensor, ...]]:
    """The plan :func:`mgic_transform.mgicify` stored on ``gm`` and the example inputs it ran at."""
    plan = plan_of(gm) if isinstance(gm, torch.fx.GraphModule) else None
    example = tuple(plan.example_inputs) if plan is not None else ()
    if not example and plan is not None:
        example = tuple((getattr(gm, "meta", None) or {}).get("mgic_example_inputs", ()))
    if plan is None or not example:
        raise InputError(f"calibrate expects the GraphModule that mgicify returned (with its plan), got "
                         f"{type(gm).__name__}. Hint: gm = mt.mgicify(model, x, init=\"inherit\"); "
                         f"mt.calibrate(gm, model, data), or mgicify(model, x, init=\"calibrate\", calibration=data).")
    return plan, example


def _check_options(steps: Any, lr: Any, batch_size: Any, max_samples: Any, seed: Any, network_steps: Any,
                   network_lr: Any) -> None:
    checks = (("steps", steps, 0, DEFAULT_STEPS), ("batch_size", batch_size, 1, DEFAULT_BATCH_SIZE),
              ("max_samples", max_samples, 1, DEFAULT_MAX_SAMPLES), ("seed", seed, 0, 0),
              ("network_steps", network_steps, 0, DEFAULT_NETWORK_STEPS))
    for name, value, least, example in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{name} must be an integer >= {least}, got {value!r}. Hint: e.g. {name}={example}.")
    for name, value, example in (("lr", lr, DEFAULT_LR), ("network_lr", network_lr, DEFAULT_NETWORK_LR)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise InputError(f"{name} must be a positive number, got {value!r}. Hint: {name}={example}.")


def _reporter(progress: Progress) -> Optional[Callable[[str], None]]:
    if callable(progress):
        return progress
    if progress is None:
        progress = sys.stderr.isatty()
    return (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None


def _in_graph_order(gm: torch.fx.GraphModule, plan: MGICPlan) -> list[BlockDecision]:
    order = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    blocks = [d for d in plan.rewritten if d.module is not None]
    missing = [d.module for d in blocks if d.module not in order]
    if missing:
        raise MGICError(f"the plan names MGIC block(s) {missing} that the graph does not call. Hint: calibrate the "
                        f"GraphModule mgicify returned, before editing its graph.")
    return sorted(blocks, key=lambda d: order[d.module])


def _store_plan(gm: torch.fx.GraphModule, plan: MGICPlan, fits: dict[str, BlockFit], note: Optional[str]) -> None:
    """The plan with every block's :class:`BlockFit` (and the network stage's note), stored for :func:`plan_of`."""
    blocks = tuple(dataclasses.replace(d, fit=fits[d.module]) if d.module in fits else d for d in plan.blocks)
    notes = tuple(n for n in plan.notes if not n.startswith("calibrated: ")) + ((note,) if note else ())
    plan = dataclasses.replace(plan, blocks=blocks, notes=notes)
    attach_plan(gm, plan)
    legacy = getattr(gm, "_mgic_meta", None)  # a model saved by version 0.1 keeps its plan there too
    if isinstance(legacy, dict) and "mgic" in legacy:
        legacy["mgic"] = plan


@dataclasses.dataclass(frozen=True)
class _Settings:
    steps: int
    lr: float
    network_steps: int
    network_lr: float
    batch_size: int
    seed: int
    least_squares: bool
    report: Optional[Callable[[str], None]]


def calibrate(gm: torch.fx.GraphModule, original: nn.Module, data: Any, *, steps: int = DEFAULT_STEPS,
              lr: float = DEFAULT_LR, network_steps: int = DEFAULT_NETWORK_STEPS,
              network_lr: float = DEFAULT_NETWORK_LR, batch_size: int = DEFAULT_BATCH_SIZE, max_samples: int = DEFAULT_MAX_SAMPLES,
              seed: int = 0, least_squares: bool = True, progress: Progress = None) -> torch.fx.GraphModule:
    """Fit every MGIC block of ``gm`` to the activations of ``original`` on calibration inputs (in place).

    Block by block in graph order (inputs: the transformed network's activations;
    targets: the original's), then all blocks to the original's output. The module
    docstring explains the method and its measured choices.

    Args:
        gm: the GraphModule :func:`mgic_transform.mgicify` returned for ``original``
            (normally with ``init="inherit"``, the Galerkin start; ``"scratch"`` works too).
            Modified in place and returned; its modules' ``training`` flags are restored.
        original: the trained model ``gm`` was made from. Never modified.
        data: calibration inputs (no labels are used): a tensor of samples, or an
            iterable of batches, each a tensor or a tuple/list whose first items are the
            model's inputs (a DataLoader's ``(input, target)``). At most ``max_samples``
            samples are read, once.
        steps, lr: Adam steps per block (0: none) and their peak learning rate (cosine-decayed).
        network_steps, network_lr: the same for the network's output, after the blocks.
        batch_size: samples per forward while caching activations and per Adam step.
        max_samples: calibration samples used; one block's inputs and targets for
            this many samples are held in memory at a time.
        seed: fixes the mini-batch draws: the same seed gives the same weights.
            The global RNG state is left as it was.
        least_squares: first solve the finest level's layers in closed form (step 0 of the
            module docstring); ``False``: Adam alone.
        progress: a line per block and for the network stage, on stderr (``None``: when it
            is a terminal); a callable receives the lines instead.

    Returns:
        ``gm``. Its plan (:func:`mgic_transform.plan_of`) records per rewritten block a
        :class:`~mgic_transform.plan.BlockFit`, whose ``error_after`` is measured with the
        final weights on the inputs the block gets in the final network, and, when the
        network stage ran, a note with the network's output error before and after it.

    Raises:
        InputError: unusable data or options, or an ``original`` that does not trace to
            the graph ``mgicify`` saw.
    """
    plan, example = _plan_and_inputs(gm)
    if not isinstance(original, nn.Module):
        raise InputError(f"original must be the nn.Module mgicify transformed, got {type(original).__name__}. "
                         f"Hint: mt.calibrate(gm, model, data).")
    _check_options(steps, lr, batch_size, max_samples, seed, network_steps, network_lr)
    settings = _Settings(steps, lr, network_steps, network_lr, batch_size, seed, least_squares, _reporter(progress))
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    flags = {m: m.training for m in gm.modules()}
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        calib = CalibrationData.read(data, len(example), example, max_samples, device)
        blocks = _in_graph_order(gm, plan)
        if not blocks:
            return gm
        traced = _private_original(original, plan)
        gm.eval()
        try:
            fits, note = _run(gm, traced, blocks, calib, settings)
        finally:
            for m, flag in flags.items():
                m.training = flag
    _store_plan(gm, plan, fits, note)
    return gm


def block_errors(gm: torch.fx.GraphModule, original: nn.Module, data: Any, *, least_squares: bool = True,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_samples: int = 256) -> dict[str, float]:
    """How far each rewritten block of ``gm`` is from the block it replaced, measured on its own: ``{path: error}``.

    For every rewritten block, ``||B(x) - y|| / ||y||`` where ``x`` and ``y`` are the
    *original's* activations at the block's entry and exit on the calibration
    inputs, and ``B`` a private copy of the MGIC block after the cheap, deterministic
    part of the fit (the finest level solved in closed form, statistics re-estimated;
    no Adam). The inputs come from the original, not from the transformed network,
    so a block's error does not depend on how the others are sized: errors of
    different candidate networks can be combined block by block (the budget
    search's ``Sensitivity``). ``gm`` and ``original`` are not modified; the keys
    are ``BlockDecision.path``. ``least_squares=False`` measures the blocks as they
    are (statistics re-estimated only).
    """
    plan, example = _plan_and_inputs(gm)
    if not isinstance(original, nn.Module):
        raise InputError(f"original must be the nn.Module mgicify transformed, got {type(original).__name__}. "
                         f"Hint: block_errors(gm, model, data).")
    _check_options(0, DEFAULT_LR, batch_size, max_samples, 0, 0, DEFAULT_NETWORK_LR)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        calib = CalibrationData.read(data, len(example), example, max_samples, device)
    traced = _private_original(original, plan)
    errors = {}
    for d in _in_graph_order(gm, plan):
        block = copy.deepcopy(gm.get_submodule(d.module)).eval()
        layers = _finest_layers(block, d, traced) if least_squares else []
        cached = _cache_block(gm, traced, d, calib, batch_size, inner=[node for _, node in layers],
                              inputs_from_original=True, check=block)
        _least_squares_finest(block, cached, layers, batch_size)
        _estimate_statistics(block, cached, batch_size, keep=_running_norms(block.levels[0]) if layers else ())
        errors[d.path] = _relative_error(block, cached, batch_size)
    return errors


def _run(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule, blocks: Sequence[BlockDecision],
         calib: CalibrationData, settings: _Settings) -> tuple[dict[str, BlockFit], Optional[str]]:
    """The blocks in graph order, the network stage, one statistics refit; returns the fits and the stage's note.

    The statistics refit (step 3) runs once, at the end, over every block in one
    pass: it leaves the eval-mode function as it is, so the blocks fitted after a
    block, and the network stage, see the same inputs as with a refit per block,
    while every Adam step works on norms whose affine maps have their natural scale
    (a compensated weight ``w s'/s`` can be far from it, where Adam's steps of about
    ``lr`` are then far too large or too small).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    fits = {d.module: _calibrate_block(gm, traced, d, k, len(blocks), calib, settings, generator)
            for k, d in enumerate(blocks, 1)}
    modules = [gm.get_submodule(d.module) for d in blocks]
    note = _network_stage(gm, traced, modules, calib, settings, generator) if settings.network_steps > 0 else None
    _refit(lambda: [gm(*batch) for batch in calib.batches(settings.batch_size)], modules)
    if note is not None and "reverted" not in note:
        for d in blocks:  # the blocks moved: their errors in the final network
            data = _cache_block(gm, traced, d, calib, settings.batch_size)
            fits[d.module] = dataclasses.replace(fits[d.module], error_after=_relative_error(
                gm.get_submodule(d.module), data, settings.batch_size))
    return fits, note


def _network_stage(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule, modules: Sequence[nn.Module],
                   calib: CalibrationData, settings: _Settings, generator: torch.Generator) -> Optional[str]:
    """Step 4, kept only if it lowered the output error on the calibration set; returns the plan's note."""
    t0 = time.perf_counter()
    targets = _network_targets(traced, calib, settings.batch_size)
    if not targets:
        return None
    before = _network_error(gm, calib, targets, settings.batch_size)
    saved = [copy.deepcopy(m.state_dict()) for m in modules]
    taken = _fit_network(gm, modules, calib, targets, steps=settings.network_steps, lr=settings.network_lr,
                         batch_size=settings.batch_size, generator=generator)
    after = _network_error(gm, calib, targets, settings.batch_size)
    kept = after <= before
    if not kept:
        for m, state in zip(modules, saved):
            m.load_state_dict(state)
    what = (f"network output error {before:.3f} -> {after:.3f}" if kept else
            f"network output error {before:.3f} (the network stage reverted: it raised it to {after:.3f})")
    line = f"{what} ({taken} Adam steps, {len(calib)} samples, {time.perf_counter() - t0:.1f} s)"
    if settings.report is not None:
        settings.report(f"calibrate {line}")
    why = ("; every block's final error is measured after this stage, which may trade a block's own error for the "
           "network's" if kept else "")
    return f"calibrated: {line}{why}"


def _calibrate_block(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule, d: BlockDecision, k: int, total: int,
                     calib: CalibrationData, settings: _Settings, generator: torch.Generator) -> BlockFit:
    t0 = time.perf_counter()
    block = gm.get_submodule(d.module)
    layers = _finest_layers(block, d, traced) if settings.least_squares else []
    data = _cache_block(gm, traced, d, calib, settings.batch_size, inner=[node for _, node in layers])
    before = _relative_error(block, data, settings.batch_size)
    taken = _fit_block(block, data, steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
                       generator=generator, layers=layers)
    after = _relative_error(block, data, settings.batch_size)
    fit = BlockFit(before, after, taken, len(data), time.perf_counter() - t0)
    if settings.report is not None:
        settings.report(f"calibrate {d.module} [{k}/{total}]: error {before:.3f} -> {after:.3f} "
                        f"({taken} steps, {fit.samples} samples, {fit.seconds:.1f} s)")
    return fit
