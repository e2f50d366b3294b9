"""Grid-transfer operators (restriction R, prolongation P) and the grouped layers they share.

Paper Sec. 3.3.3: ``R_j`` is a grouped 1x1 convolution that halves the channels,
``P_j`` has the transposed structure, both learned. The paper initialises them with
positive weights whose rows sum to 1 (:func:`init_transfer_`); the compiler gives them
PyTorch's default convolution init instead, as the authors' code ends up doing, and
starts the residual norm ``N_j`` at weight 0, so every coarse-grid correction starts
switched off and the network trains from its fine grouped blocks outward. Measured in
``benchmarks/results/accuracy_per_parameter.md`` (issue 11, 2-3 seeds): on MNIST-1D and
digits this init gave higher test accuracy at all 4 MGIC points (+0.4 to +3.1 points) and
higher validation accuracy at 3 of 4 (the fourth within one validation image). For channels-first tensors with spatial
dimensions they are :class:`PointwiseConv2d` (and its 1-d / 3-d siblings): an
``nn.Conv2d`` with kernel 1 whose grouped forward is one batched matmul; for
channels-last or ``(N, C)`` tensors they are a :class:`GroupedLinear`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupedLinear", "PointwiseConv1d", "PointwiseConv2d", "PointwiseConv3d", "ChannelBatchNorm",
           "make_transfer", "make_residual_norm", "init_transfer_", "pointwise_like", "plain_convs"]

CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_BY_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class _PointwiseMixin:
    """Forward of a kernel-1 grouped convolution as one broadcast matmul over the groups.

    A grouped 1x1 convolution is ``G`` independent ``(o, i)`` matrices applied at
    every pixel. Viewing the contiguous ``(N, C, *spatial)`` input as
    ``(N, G, i, pixels)`` makes it ``weight(G, o, i) @ x``: one batched GEMM, no
    copy of the input. PyTorch's CPU convolution instead runs a grouped 1x1 conv
    per group and per image with a ``narrow`` + ``contiguous`` copy of each group
    and a ``cat`` (its THNN kernel, chosen for 1x1 kernels on one thread), or
    through oneDNN's grouped kernel; both were slower at every ResNet-50 MGIC
    shape, forward and backward, 1 and 2 threads (``benchmarks/grouped_pointwise.py``).

    The math, the parameters and the ``state_dict`` are exactly those of the
    ``nn.Conv{1,2,3}d`` this is a subclass of. Ungrouped convolutions and inputs
    in another memory format (channels-last) take the ordinary convolution.
    """

    groups: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None

    def to_conv(self) -> nn.Module:
        """The plain ``nn.Conv{1,2,3}d`` this layer computes (same weights, copied), e.g. for an export target."""
        conv = CONV_BY_DIMS[len(self.kernel_size)](self.in_channels, self.out_channels, 1, groups=self.groups,
                                                   bias=self.bias is not None, device=self.weight.device,
                                                   dtype=self.weight.dtype)
        conv.load_state_dict(self.state_dict())  # type: ignore[attr-defined]
        return conv.train(self.training)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A tensor in another memory format would be copied by the views below; a
        # torch.fx Proxy (symbolic tracing) is not a Tensor and records a matmul.
        if self.groups == 1 or (isinstance(x, torch.Tensor) and not x.is_contiguous()):
            return super().forward(x)  # type: ignore[misc]
        if not isinstance(x, torch.Tensor):
            return _symbolic_pointwise(x, self.weight, self.bias, self.groups, len(self.kernel_size))
        return grouped_pointwise(x, self.grouped_weight(), self.bias, len(self.kernel_size))

    def grouped_weight(self) -> torch.Tensor:
        """The weight as ``(groups, out / groups, in / groups)``: a view of the parameter, cached between calls.

        The cache is a view, so in-place updates (optimizer steps, ``load_state_dict``)
        show through it. It is rebuilt whenever it could be stale or carry the wrong
        autograd state: another weight object (``module.weight = ...``, ``.to()`` with
        new parameters, ``torch.func`` substituting tensors: not cached at all), other
        memory (``.data = ...``, ``.to()``, ``share_memory_()``), or a different
        ``requires_grad`` (grad mode toggled, ``requires_grad_(False)``). Never cached under
        ``torch.compile`` or ``torch.jit.trace`` (fvcore's FLOP count, ONNX export: a view made
        before the trace would enter it as a constant, and a view of a parameter that requires
        grad requires grad even under ``no_grad``, which a trace refuses), never pickled or
        deep-copied (``__getstate__``).
        """
        w = self.weight
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(w) is not nn.Parameter:
            return w.view(self.groups, self.out_channels // self.groups, -1)
        grad = w.requires_grad and torch.is_grad_enabled()
        cached = self.__dict__.get("_weight_view")
        if cached is not None and cached[0] is w and cached[2] == grad and cached[1].data_ptr() == w.data_ptr():
            return cached[1]
        view = w.view(self.groups, self.out_channels // self.groups, -1)
        self.__dict__["_weight_view"] = (w, view, grad)
        return view

    def __getstate__(self):
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_weight_view", None)
        return state


def grouped_pointwise(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dims: int) -> torch.Tensor:
    """A grouped kernel-1 convolution of a contiguous ``x`` with ``w`` viewed as ``(groups, o, i)``.

    ``F.conv{dims}d(x, weight, bias, groups=G)`` for the ``(G * o, i, 1, ...)`` ``weight``
    that ``w`` views. ``x`` (``(N, G * i, *spatial)`` or unbatched) is viewed, never
    copied, as ``(G, i, pixels)`` per image; the product's ``(G, o, pixels)`` is already
    the output's memory layout, so one ``view`` gives the ``(N, G * o, *spatial)`` result.
    At batch 1 that is 5 aten ops (2 views and a ``bmm`` with its two ``resolve_conj``),
    where the former ``flatten``/``unflatten`` chain took 17.
    """
    groups, o, i = w.shape
    shape = x.shape
    batch, spatial = shape[:-dims - 1], shape[-dims:]
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # no branch on the batch size: one matmul
        y = torch.matmul(w, x.view(*batch, groups, i, -1))
    elif not batch or shape[0] == 1:  # unbatched (C, *spatial), or one image: a plain bmm over the groups
        y = torch.bmm(w, x.view(groups, i, math.prod(spatial)))
    else:
        y = _grouped_matmul(w, x.view(shape[0], groups, i, math.prod(spatial)))
    if bias is not None:  # in place: bmm / matmul do not save their output for backward
        y = y.add_(bias.view(groups, o, 1))
    return y.view(*batch, groups * o, *spatial)


def _symbolic_pointwise(x, weight, bias, groups: int, dims: int):
    """The grouped 1x1 as ``torch.matmul`` on views, for a ``torch.fx`` Proxy (shapes unknown while tracing)."""
    w = weight.view(groups, weight.shape[0] // groups, weight.shape[1])
    xg = x.flatten(-dims).unflatten(-2, (groups, -1))  # (N, G, i, pixels), a view
    y = torch.matmul(w, xg)  # (N, G, o, pixels)
    if bias is not None:
        y = y.add_(bias.view(groups, -1, 1))
    return y.flatten(-3, -2).unflatten(-1, x.shape[-dims:])


def _grouped_matmul(w: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(w, xg)`` for ``w (G, o, i)`` and ``xg (N, G, i, P)``, without copying ``w`` per image.

    ``torch.matmul`` broadcasts ``w`` over the batch by expanding it to
    ``(N, G, o, i)`` and reshaping that to ``(N * G, o, i)``: a copy of the weight
    per image (and, in the backward pass, a ``sum`` over the batch). At 7x7 maps
    the copy is a third of the input's size. Without autograd, the images are one
    ``bmm`` each, written into one output. Same products, same sums: the result is
    the same.

    Under ``torch.compile`` (and ``torch.export``) it is plain ``torch.matmul``: inductor
    plans the broadcast itself, and a Python loop of ``out=`` products traced into the
    graph made the compiled MGIC ResNet-50 slower than eager (batch 8, 2 threads: 367 vs
    272 ms compiled with ``matmul``; ``benchmarks/results/compile_inference.md``). Under
    ``torch.jit.trace`` too: a traced loop would fix the batch size, and the grad mode.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or (
            torch.is_grad_enabled() and (w.requires_grad or xg.requires_grad)):
        return torch.matmul(w, xg)
    if xg.dim() == 3:
        return torch.bmm(w, xg)
    y = xg.new_empty(xg.shape[0], w.shape[0], w.shape[1], xg.shape[-1])
    for n in range(xg.shape[0]):
        torch.bmm(w, xg[n], out=y[n])
    return y


class PointwiseConv1d(_PointwiseMixin, nn.Conv1d):
    """``nn.Conv1d(in_channels, out_channels, 1, groups=groups, bias=bias)`` with a matmul forward when grouped."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype)


class PointwiseConv2d(_PointwiseMixin, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=bias)`` with a matmul forward when grouped."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype)


class PointwiseConv3d(_PointwiseMixin, nn.Conv3d):
    """``nn.Conv3d(in_channels, out_channels, 1, groups=groups, bias=bias)`` with a matmul forward when grouped."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype)


POINTWISE_BY_DIMS = {1: PointwiseConv1d, 2: PointwiseConv2d, 3: PointwiseConv3d}


def plain_convs(module: nn.Module) -> nn.Module:
    """Swap, in place, every :class:`PointwiseConv2d` (1d/3d) in ``module`` for the plain conv it computes.

    The result computes the same (grouped 1x1 convs through PyTorch's convolution);
    useful to compare against, or for a consumer that knows only ``nn.Conv2d``.
    Returns ``module``.
    """
    for name, m in list(module.named_modules()):
        if isinstance(m, _PointwiseMixin):
            module.set_submodule(name, m.to_conv())
    return module


def pointwise_like(conv: nn.Module) -> type | None:
    """The :class:`PointwiseConv2d` (1d/3d) class that can stand in for ``conv``, or ``None``.

    Only a plain ``nn.Conv{1,2,3}d`` (not a user subclass, whose forward may do
    more) with kernel, stride and dilation 1, no padding and more than one group.
    """
    if type(conv) not in CONV_BY_DIMS.values() or conv.groups == 1:
        return None
    if any(v != 1 for v in (*conv.kernel_size, *conv.stride, *conv.dilation)):
        return None
    padded = conv.padding != "valid" if isinstance(conv.padding, str) else any(conv.padding)
    if padded:
        return None
    return POINTWISE_BY_DIMS[len(conv.kernel_size)]


class GroupedLinear(nn.Module):
    """A block-diagonal ``nn.Linear`` on the last dimension: ``groups`` independent linear maps.

    ``GroupedLinear(in, out, 1)`` computes exactly what ``nn.Linear(in, out)`` does.
    The weight has shape ``(groups, out // groups, in // groups)``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide in_features={in_features} and out_features={out_features}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The init ``nn.Linear`` uses, per group (fan-in is the group's input width)."""
        bound = 1.0 / math.sqrt(self.in_features // self.groups)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight[0], self.bias)
        g, o, i = self.weight.shape
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (g, i)), self.weight).flatten(-2)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}, bias={self.bias is not None}"


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the *last* dimension of a channels-last tensor of any rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


@torch.no_grad()
def init_transfer_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Positive weights with every row (one output channel over its ``fan_in`` group inputs) summing to 1."""
    rows = torch.rand(weight.numel() // fan_in, fan_in, dtype=weight.dtype, device=weight.device) + 0.5
    rows /= rows.sum(dim=1, keepdim=True)
    weight.copy_(rows.reshape(weight.shape))
    return weight


def make_transfer(in_ch: int, out_ch: int, groups: int, *, spatial_dims: int, channels_last: bool,
                  like: torch.Tensor | None = None) -> nn.Module:
    """A grouped 1x1 transfer operator ``in_ch -> out_ch`` (no bias).

    Initialised as PyTorch initialises a convolution (uniform in ``+-1/sqrt(fan_in)``,
    ``fan_in = in_ch / groups``; :class:`GroupedLinear` draws the same). For the paper's
    positive row-stochastic init, call ``init_transfer_(op.weight, in_ch // groups)``.
    """
    kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    if channels_last or spatial_dims == 0:
        return GroupedLinear(in_ch, out_ch, groups, bias=False, **kw)
    return POINTWISE_BY_DIMS[spatial_dims](in_ch, out_ch, groups, bias=False, **kw)


def make_residual_norm(channels: int, *, spatial_dims: int, channels_last: bool,
                       like: torch.Tensor | None = None) -> nn.Module:
    """The BatchNorm ``N_j`` applied to the prolonged coarse-grid residual, with weight 0.

    The correction ``N_j(P_j(x_{j+1} - R_j x_j))`` is then exactly zero at initialisation
    (in training and eval mode), so a fresh MGIC block computes its finest grouped block
    and learns how much of each coarse level to add, as zero-initialised residual branches
    do (Goyal et al. 2017). The weight still gets gradients: the normalised input is not zero.
    """
    kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    norm = ChannelBatchNorm(channels, **kw) if channels_last else BN_BY_DIMS[max(spatial_dims, 1)](channels, **kw)
    nn.init.zeros_(norm.weight)
    return norm
