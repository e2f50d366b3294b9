"""Random CNNs for property tests: a hypothesis strategy over small networks written as plain data.

A drawn spec prints as a readable tuple that can be pasted into ``@example``: Conv1d or
Conv2d; odd and non-power-of-two widths; plain conv-bn-relu layers (some grouped,
depthwise or strided, some width-changing); residual units (grouped); concat joins;
multiply gates; squeeze-excite; MobileNet inverted residuals (depthwise + optional SE);
ShuffleNetV2 units (chunk, concat, channel shuffle); GroupNorm/PReLU/layer-scale units;
pooling. :func:`check_transform` checks every property ``tests/test_properties.py``
lists. Shared by ``tests/test_properties.py`` and ``tests/regressions/``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

import mgic_transform as mt
from mgic_transform.nn import MGICBlock

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # reproducible in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# --------------------------------------------------------------------------- random CNNs from a spec

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}


def _squeeze(x, d):
    return x.mean(dim=(2, 3) if d == 2 else 2, keepdim=True)


class Plain(nn.Module):
    """conv-bn-relu; width-changing when ``out != w``, grouped/depthwise via ``groups``, strided via ``stride``."""

    def __init__(self, d, w, out, k, groups, stride):
        super().__init__()
        self.conv = CONV[d](w, out, k, stride=stride, padding=k // 2, groups=groups, bias=False)
        self.bn = BN[d](out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    """Basic residual unit with grouped convs, written inline; optional post-activation."""

    def __init__(self, d, w, hidden, k, groups, post_act):
        super().__init__()
        self.conv1 = CONV[d](w, hidden, k, padding=k // 2, groups=groups, bias=False)
        self.bn1 = BN[d](hidden)
        self.conv2 = CONV[d](hidden, w, k, padding=k // 2, groups=groups, bias=False)
        self.bn2 = BN[d](w)
        self.post_act = post_act

    def forward(self, x):
        y = x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y) if self.post_act else y


class Concat(nn.Module):
    """Two branches of widths ``split`` and ``w - split`` joined by ``torch.cat``."""

    def __init__(self, d, w, split, k):
        super().__init__()
        self.a = CONV[d](w, split, k, padding=k // 2)
        self.b = CONV[d](w, w - split, 1)
        self.bn = BN[d](w)

    def forward(self, x):
        return F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))


class Gate(nn.Module):
    """Multiplicative join of full-resolution tensors: ``x * sigmoid(bn(conv(x)))``."""

    def __init__(self, d, w, k):
        super().__init__()
        self.conv = CONV[d](w, w, k, padding=k // 2)
        self.bn = BN[d](w)

    def forward(self, x):
        return x * torch.sigmoid(self.bn(self.conv(x)))


class SE(nn.Module):
    """conv-bn with a squeeze-excite gate of squeeze width ``r``, inside a residual."""

    def __init__(self, d, w, r, k):
        super().__init__()
        self.d = d
        self.conv = CONV[d](w, w, k, padding=k // 2, bias=False)
        self.bn = BN[d](w)
        self.fc1 = CONV[d](w, r, 1)
        self.fc2 = CONV[d](r, w, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(_squeeze(y, self.d)))))
        return F.relu(x + y * s)


class InvRes(nn.Module):
    """MobileNetV2/V3 inverted residual: expand 1x1, depthwise kxk, optional SE, project 1x1."""

    def __init__(self, d, w, hidden, k, se):
        super().__init__()
        self.d = d
        self.expand = CONV[d](w, hidden, 1, bias=False)
        self.bn1 = BN[d](hidden)
        self.dw = CONV[d](hidden, hidden, k, padding=k // 2, groups=hidden, bias=False)
        self.bn2 = BN[d](hidden)
        r = max(1, hidden // 4)
        self.se = nn.Sequential(CONV[d](hidden, r, 1), nn.ReLU(), CONV[d](r, hidden, 1), nn.Hardsigmoid()) if se else None
        self.project = CONV[d](hidden, w, 1, bias=False)
        self.bn3 = BN[d](w)

    def forward(self, x):
        y = F.hardswish(self.bn1(self.expand(x)))
        y = F.hardswish(self.bn2(self.dw(y)))
        if self.se is not None:
            y = y * self.se(_squeeze(y, self.d))
        return x + self.bn3(self.project(y))


class Shuffle(nn.Module):
    """ShuffleNetV2 unit: split the channels in halves, transform one, concatenate, shuffle (even widths)."""

    def __init__(self, d, w, k):
        super().__init__()
        h = w // 2
        self.branch = nn.Sequential(CONV[d](h, h, 1, bias=False), BN[d](h), nn.ReLU(),
                                    CONV[d](h, h, k, padding=k // 2, groups=h, bias=False), BN[d](h),
                                    CONV[d](h, h, 1, bias=False), BN[d](h), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        out = torch.cat((a, self.branch(b)), dim=1)
        return out.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)


class Fancy(nn.Module):
    """Dilated biased conv, GroupNorm, PReLU (shared or per channel) and a layer-scale parameter of its own."""

    def __init__(self, d, w, k, gn_groups, prelu_shared):
        super().__init__()
        self.conv = CONV[d](w, w, k, padding=(k // 2) * 2, dilation=2)
        self.norm = nn.GroupNorm(gn_groups, w)
        self.act = nn.PReLU() if prelu_shared else nn.PReLU(w)
        self.scale = nn.Parameter(torch.full((w,) + (1,) * d, 0.5))

    def forward(self, x):
        return x + self.scale * self.act(self.norm(self.conv(x)))


class Pool(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.pool = POOL[d](2)

    def forward(self, x):
        return self.pool(x)


KINDS = {"plain": Plain, "residual": Residual, "concat": Concat, "gate": Gate, "se": SE, "invres": InvRes,
         "shuffle": Shuffle, "fancy": Fancy, "pool": Pool}


class RandomCNN(nn.Module):
    """``spec = (dims, in_channels, stem_width, blocks, classes)``; ``blocks`` are ``(kind, *args)`` tuples."""

    def __init__(self, spec):
        super().__init__()
        d, in_ch, stem, blocks, classes = spec
        self.stem = nn.Sequential(CONV[d](in_ch, stem, 3, padding=1, bias=False), BN[d](stem), nn.ReLU())
        self.body = nn.Sequential(*[KINDS[kind](d, *args) for kind, *args in blocks])
        w = stem
        for kind, *args in blocks:
            if kind == "plain":
                w = args[1]
        self.head = nn.Linear(w, classes)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(x.flatten(2).mean(-1))


def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


@st.composite
def cnn_specs(draw, max_blocks=4, max_width=48):
    d = draw(st.sampled_from([2, 1]))
    width = st.integers(3, max_width)
    w = stem = draw(width)
    blocks, pools = [], 0
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(sorted(KINDS)))
        k = draw(st.sampled_from([3, 1]))
        if kind == "plain":
            out = draw(st.one_of(st.just(w), width))
            groups = draw(st.sampled_from(_divisors(math.gcd(w, out))))
            stride = draw(st.sampled_from([1, 2])) if pools < 2 else 1
            pools += stride == 2
            blocks.append(("plain", w, out, k, groups, stride))
            w = out
        elif kind == "residual":
            groups = draw(st.sampled_from(_divisors(w)))
            hidden = groups * draw(st.integers(1, max(1, 48 // groups)))
            blocks.append(("residual", w, hidden, k, groups, draw(st.booleans())))
        elif kind == "concat":
            blocks.append(("concat", w, draw(st.integers(1, w - 1)), k))
        elif kind == "gate":
            blocks.append(("gate", w, k))
        elif kind == "se":
            blocks.append(("se", w, draw(st.integers(2, max(2, w // 2))), k))
        elif kind == "invres":
            blocks.append(("invres", w, draw(st.integers(w, 3 * w)), k, draw(st.booleans())))
        elif kind == "shuffle" and w % 2 == 0:
            blocks.append(("shuffle", w, k))
        elif kind == "fancy":
            blocks.append(("fancy", w, k, draw(st.sampled_from(_divisors(w))), draw(st.booleans())))
        elif kind == "pool" and pools < 2:
            pools += 1
            blocks.append(("pool",))
    return (d, 3, stem, tuple(blocks), 5)


def example_input(spec, batch=2, size=None):
    d = spec[0]
    size = size or (8 if d == 2 else 16)
    return torch.randn(batch, spec[1], *((size, size) if d == 2 else (size,)))


# --------------------------------------------------------------------------- helpers


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m), m.training) for n, m in model.named_modules()])


def _assert_untouched(model, snap):
    state, mods = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]), f"mgicify changed the input model's {k}"
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == mods


def _mgic_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MGICBlock)]


def check_transform(model, x, *, one_line_reasons=True, **options):
    """Transform ``model`` and check every property listed in the module docstring; return the result."""
    model.train()
    snap = _snapshot(model)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        other = example_input_like(x, batch=3)
        reference_other = model(other)
    model.train()
    snap = _snapshot(model)
    n_before = _n_params(model)

    gm = mt.mgicify(model, x, **options)

    # the input model is untouched
    _assert_untouched(model, snap)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    model.train()

    # a linted GraphModule with one MGICBlock call per rewritten block
    assert isinstance(gm, torch.fx.GraphModule)
    gm.graph.lint()
    plan = gm.meta["mgic"]
    assert len(_mgic_nodes(gm)) == len(plan.rewritten)
    assert gm.training == model.training

    # parameters never grow; each rewritten block shrank, as recorded
    assert _n_params(gm) <= n_before
    assert (_n_params(gm) < n_before) == bool(plan.rewritten)
    for d in plan.rewritten:
        block = gm.get_submodule(d.module)
        assert isinstance(block, MGICBlock)
        assert d.params_after == _n_params(block) < d.params_before
        _check_levels(d, options["group_size"], options.get("coarsest_width") or options["group_size"],
                      options.get("rule", "paper"))
        assert block.num_levels == len(d.levels)
    for d in plan.skipped:
        assert d.reason and d.module is None
        if one_line_reasons:  # reports and the CLI show one line per block
            assert "\n" not in d.reason, d.reason

    # output shape kept, in train mode; backward reaches every parameter
    gm.train()
    out = gm(x)
    assert out.shape == reference.shape
    out.pow(2).mean().backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"

    # eval mode: deterministic, shape kept, also at another batch and spatial size
    gm.eval()
    with torch.no_grad():
        y1, y2 = gm(x), gm(x)
        assert torch.equal(y1, y2)
        assert torch.isfinite(y1).all()
        assert gm(other).shape == reference_other.shape
    if not plan.rewritten:  # nothing rewritten: the very same function (only the train step above differs)
        fresh = mt.mgicify(model, x, **options).eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), reference)
            assert torch.equal(fresh(other), reference_other)
    return gm


def example_input_like(x, batch):
    """Another batch size and twice the spatial size (any stride pattern accepts that)."""
    return torch.randn(batch, x.shape[1], *(2 * s for s in x.shape[2:]))


def _check_levels(d, group_size, coarsest_width, rule):
    levels, groups = d.levels, d.groups
    assert levels[0] == d.out_width and len(levels) >= 2
    if rule == "compact":  # the outer width halves until it is at most s_c
        assert levels[-1] <= coarsest_width < levels[-2]
        assert all(b == a // 2 for a, b in zip(levels, levels[1:]))
    else:  # the narrowest width halves; the outer one follows it, up to rounding
        assert all(a // 2 - 1 <= b <= a // 2 + 1 for a, b in zip(levels, levels[1:]))
    assert len(groups) == len(levels) and groups[-1] == 1
    assert all(c % g == 0 for c, g in zip(levels, groups))
    assert d.group_sizes == tuple(c // g for c, g in zip(levels, groups))
