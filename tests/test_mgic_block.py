"""MGICBlock semantics: the identity property, transfer-operator init, parameter count vs. formula (3.5)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgic_transform as mt
from mgic_transform.hierarchy import level_groups, level_widths, transfer_groups
from mgic_transform.nn import MGICBlock
from mgic_transform.nn.mgic_block import reference_forward
from mgic_transform.nn.transfer import (
    CONV_BY_DIMS,
    init_transfer_,
    POINTWISE_BY_DIMS,
    GroupedLinear,
    make_residual_norm,
    make_transfer,
    plain_convs,
    pointwise_like,
)


def _identity_mgic(widths, s_g, spatial_dims, channels_last=False):
    space = {"spatial_dims": spatial_dims, "channels_last": channels_last}
    pairs = list(zip(widths, widths[1:]))
    return MGICBlock(
        [nn.Identity() for _ in widths],
        [make_transfer(f, c, transfer_groups(f, c, s_g), **space) for f, c in pairs],
        [make_transfer(c, f, transfer_groups(f, c, s_g), **space) for f, c in pairs],
        [make_residual_norm(f, **space) for f, _ in pairs],
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape, spatial_dims, channels_last",
    [((4, 64, 5, 5), 2, False), ((4, 64, 9), 1, False), ((4, 64), 0, False), ((4, 3, 7, 64), 0, True)],
)
def test_identity_block_gives_identity_mgic_block(shape, spatial_dims, channels_last, training):
    torch.manual_seed(0)
    block = _identity_mgic(level_widths(64, 16), 8, spatial_dims, channels_last).train(training)
    x = torch.randn(*shape)
    torch.testing.assert_close(block(x), x, rtol=0, atol=1e-6)


def test_non_identity_levels_change_the_output():
    """Guard for the identity test: with a real coarse block the output does change."""
    torch.manual_seed(0)
    block = _identity_mgic((64, 32, 16), 8, 2)
    block.levels[-1] = nn.Conv2d(16, 16, 3, padding=1)
    for n in block.norms:  # they start at weight 0 (corrections off): switch the corrections on
        nn.init.ones_(n.weight)
    x = torch.randn(2, 64, 5, 5)
    assert not torch.allclose(block(x), x)


@pytest.mark.parametrize("channels_last, spatial_dims", [(False, 2), (False, 1), (False, 0), (True, 0)])
@pytest.mark.parametrize("fine, coarse, groups", [(64, 32, 8), (256, 128, 8), (75, 37, 1)])
def test_paper_transfer_init_positive_rows_sum_to_one(fine, coarse, groups, channels_last, spatial_dims):
    for a, b in ((fine, coarse), (coarse, fine)):
        op = make_transfer(a, b, groups, spatial_dims=spatial_dims, channels_last=channels_last)
        init_transfer_(op.weight, a // groups)
        w = op.weight.detach()
        assert (w > 0).all()
        rows = w.reshape(b, -1) if not isinstance(op, GroupedLinear) else w.reshape(-1, a // groups)
        assert rows.shape == (b, a // groups)
        torch.testing.assert_close(rows.sum(1), torch.ones(b))
        # as an operator: a constant input stays constant (each output averages its group)
        x = torch.full((2, a) + (3,) * (spatial_dims if not channels_last else 0), 5.0)
        y = op(x.movedim(1, -1) if channels_last else x)
        torch.testing.assert_close(y, torch.full_like(y, 5.0))


@pytest.mark.parametrize("channels_last, spatial_dims", [(False, 2), (False, 1), (True, 0)])
def test_default_transfer_init_is_pytorchs_conv_init(channels_last, spatial_dims):
    """R/P start as PyTorch starts a conv (uniform, +-1/sqrt(fan_in)), not positive and row-stochastic:
    measured better in benchmarks/results/accuracy_per_parameter.md (issue 11)."""
    torch.manual_seed(0)
    op = make_transfer(256, 128, 8, spatial_dims=spatial_dims, channels_last=channels_last)
    w, bound = op.weight.detach(), 1 / (256 // 8) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert (w < 0).float().mean() > 0.4  # both signs, so rows do not sum to 1
    assert w.std() == pytest.approx(bound / 3**0.5, rel=0.1)


@pytest.mark.parametrize("training", [True, False])
def test_fresh_mgic_block_computes_its_finest_level(training):
    """N_j starts at weight 0: every coarse-grid correction is off, the block is its finest grouped level."""
    torch.manual_seed(0)
    gm = mt.mgicify(_OneConv(64), torch.randn(1, 3, 8, 8), group_size=8, coarsest_width=16).train(training)
    block = gm.get_submodule(gm.meta["mgic"].rewritten[0].module)
    assert isinstance(block, MGICBlock) and block.num_levels >= 3
    assert all((n.weight == 0).all() for n in block.norms)
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(block(x), block.levels[0](x), rtol=0, atol=0)
    # guard: the coarse levels are wired in and matter once N_j is non-zero
    with torch.no_grad():
        for n in block.norms:
            n.weight.fill_(1.0)
    assert not torch.allclose(block(x), block.levels[0](x))


def test_grouped_linear_matches_block_diagonal_linear():
    torch.manual_seed(0)
    gl = GroupedLinear(12, 6, groups=3)
    dense = torch.block_diag(*gl.weight.detach())  # (6, 12)
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(gl(x), x @ dense.T + gl.bias.detach())


class _OneConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.stem(x))


def test_parameter_count_matches_formula_3_5():
    """One 3x3 conv of width c=64 with s_g=8, s_c=16, worked by hand against (3.5)."""
    c, s_g, s_c, d = 64, 8, 16, 3
    gm = mt.mgicify(_OneConv(c), torch.randn(1, 3, 8, 8), group_size=s_g, coarsest_width=s_c, rule="compact")
    (decision,) = gm.meta["mgic"].rewritten
    block = gm.get_submodule(decision.module)
    assert isinstance(block, MGICBlock)
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())
    # relaxation: grouped s_g*c_j*d^2 at the fine levels, s_c^2*d^2 at the coarsest
    assert [count([lv]) for lv in block.levels] == [s_g * 64 * d * d, s_g * 32 * d * d, s_c * s_c * d * d]
    # transfer: R_j and P_j together s_g * c_j
    assert [count([r, p]) for r, p in zip(block.restrict, block.prolong)] == [s_g * 64, s_g * 32]
    by_hand = sum(s_g * cj * (d * d + 1) for cj in (64, 32)) + s_c * s_c * d * d
    norms = count(block.norms)  # BatchNorm on the prolonged residual: 2 c_j, outside the formula
    assert count([block]) == by_hand + norms == decision.params_after
    assert decision.analytic_params == by_hand
    assert decision.levels == (64, 32, 16) and decision.groups == level_groups((64, 32, 16), s_g)


# --------------------------------------------------------------------------- the fast paths change no math


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "dims, groups, shape",
    [(2, 4, (3, 16, 5, 7)), (2, 1, (3, 16, 5, 7)), (2, 4, (16, 5, 7)), (2, 4, (1, 16, 5, 7)), (1, 8, (2, 16, 9)),
     (3, 2, (2, 16, 3, 4, 5))],
)
def test_pointwise_conv_computes_the_grouped_1x1_convolution(dims, groups, shape, bias):
    """Forward *and* both gradients equal ``F.conv{1,2,3}d`` with the same weights (batched and unbatched)."""
    torch.manual_seed(0)
    fast = POINTWISE_BY_DIMS[dims](16, 8, groups, bias=bias)
    ref = CONV_BY_DIMS[dims](16, 8, 1, groups=groups, bias=bias)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    y_fast, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y_fast, y_ref)
    g = torch.randn_like(y_ref)
    grads_fast = torch.autograd.grad(y_fast, [x, fast.weight], g)
    grads_ref = torch.autograd.grad(y_ref, [x, ref.weight], g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "frozen"])
@pytest.mark.parametrize("dims, shape", [(2, (1, 16, 5, 7)), (2, (3, 16, 5, 7)), (2, (16, 5, 7)), (1, (4, 16, 9))])
def test_pointwise_conv_without_autograd_is_the_grouped_1x1_convolution(dims, shape, mode):
    """The per-image ``bmm`` path (no weight copy) taken without autograd computes the same."""
    torch.manual_seed(0)
    fast = POINTWISE_BY_DIMS[dims](16, 8, 4, bias=True)
    ref = CONV_BY_DIMS[dims](16, 8, 1, groups=4, bias=True)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape)
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "frozen": torch.enable_grad}[mode]
    if mode == "frozen":  # autograd on, but nothing requires grad
        fast.requires_grad_(False)
    with ctx():
        torch.testing.assert_close(fast(x), ref(x))


def test_pointwise_conv_to_conv_is_the_same_layer():
    torch.manual_seed(0)
    fast = POINTWISE_BY_DIMS[2](16, 8, 4).eval()
    conv = fast.to_conv()
    assert type(conv) is nn.Conv2d and conv.groups == 4 and not conv.training
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(conv(x), fast(x))
    assert conv.weight.data_ptr() != fast.weight.data_ptr()  # a copy


def test_plain_convs_swaps_every_pointwise_conv_and_keeps_the_output():
    torch.manual_seed(0)
    gm = mt.mgicify(_Bottleneck(32), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8).eval()
    x = torch.randn(2, 3, 8, 8)
    before = gm(x)
    assert any(type(m) in POINTWISE_BY_DIMS.values() for m in gm.modules())
    assert plain_convs(gm) is gm
    assert not any(type(m) in POINTWISE_BY_DIMS.values() for m in gm.modules())
    torch.testing.assert_close(gm(x), before)


def test_pointwise_conv_takes_channels_last_inputs():
    torch.manual_seed(0)
    fast = POINTWISE_BY_DIMS[2](16, 8, 4)
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), torch.nn.functional.conv2d(x, fast.weight, fast.bias, groups=4))


def test_pointwise_like_only_replaces_plain_grouped_1x1_convs():
    assert pointwise_like(nn.Conv2d(8, 8, 1, groups=2)) is POINTWISE_BY_DIMS[2]
    assert pointwise_like(nn.Conv1d(8, 8, 1, groups=2, padding="valid")) is POINTWISE_BY_DIMS[1]
    for conv in (nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 1, stride=2, groups=2),
                 nn.Conv2d(8, 8, 1, padding=1, groups=2), type("MyConv", (nn.Conv2d,), {})(8, 8, 1, groups=2)):
        assert pointwise_like(conv) is None, conv


class _Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.b = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(x + self.bn(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("training", [True, False])
def test_inference_fast_path_gives_the_autograd_result_and_keeps_the_input(training):
    """Without autograd the block works in place on its own tensors: same output, input untouched."""
    torch.manual_seed(0)
    gm = mt.mgicify(_Bottleneck(32), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8).train(training)
    (decision,) = gm.meta["mgic"].rewritten
    block = gm.get_submodule(decision.module)
    assert any(type(m) in POINTWISE_BY_DIMS.values() for m in block.levels[0].modules())  # the 1x1 conv, grouped
    x = torch.randn(2, 32, 8, 8)
    x_before = x.clone()
    torch.manual_seed(1)
    ref = block(x.requires_grad_())
    with torch.inference_mode():
        torch.manual_seed(1)
        got = block(x.detach())
    torch.testing.assert_close(got, ref.detach())
    torch.testing.assert_close(x.detach(), x_before, rtol=0, atol=0)


def test_a_transformed_model_traces_again_with_plain_torch_fx():
    torch.manual_seed(0)
    gm = mt.mgicify(_Bottleneck(32), torch.randn(2, 3, 8, 8), group_size=4, coarsest_width=8).eval()
    again = torch.fx.symbolic_trace(gm)
    again.graph.lint()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(again(x), gm(x))


class _Residual(nn.Module):
    """``stem -> [x + bn(conv(x))] -> head``, the residual written in place (``x += ...``) or not."""

    def __init__(self, c, inplace):
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.stem(x)
        if self.inplace:
            x += self.bn(self.conv(x))
        else:
            x = x + self.bn(self.conv(x))
        return torch.relu(x)


def test_in_place_residual_is_traced_as_in_place_and_computes_the_same():
    """``x += ...`` stays an in-place op in the graph (no extra tensor), and the MGIC result does not depend on it.

    Here the block writes into its *own input*: the coarsest level's input ``x_L = R x`` is
    needed again for the residual ``y - x_L``, so the block must hand the level a copy.
    """
    x = torch.randn(2, 3, 8, 8)
    outs = {}
    for inplace in (True, False):
        torch.manual_seed(0)
        gm = mt.mgicify(_Residual(32, inplace), x, group_size=4, coarsest_width=8).eval()
        (decision,) = gm.meta["mgic"].rewritten
        block = gm.get_submodule(decision.module)
        assert block.coarsest_mutates_input is inplace
        assert ("+=" in block.levels[-1].code) is inplace
        outs[inplace] = gm(x)
        with torch.inference_mode():
            torch.testing.assert_close(gm(x), outs[inplace])
    torch.testing.assert_close(outs[True], outs[False])


# --------------------------------------------------------------------------- the fast path computes Algorithm 1


def _randomise_(module):
    """Random weights, biases and BatchNorm statistics everywhere: no level, norm or transfer is the identity."""
    with torch.no_grad():
        for m in module.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn_like(p) * 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return module


def _random_mgic(connector, coarsest_mutates_input, widths=(32, 16, 8), s_g=4):
    """A three-level block with grouped conv-BN-ReLU levels and, optionally, a coarsest level that writes into its input."""
    space = {"spatial_dims": 2, "channels_last": False}
    pairs = list(zip(widths, widths[1:]))
    fine = [nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c // s_g), nn.BatchNorm2d(c), nn.ReLU()) for c in widths[:-1]]
    c = widths[-1]
    coarsest = nn.Sequential(*([nn.ReLU(inplace=True)] if coarsest_mutates_input else []),
                             nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
    block = MGICBlock(
        fine + [coarsest],
        [make_transfer(f, c, transfer_groups(f, c, s_g), **space) for f, c in pairs],
        [make_transfer(c, f, transfer_groups(f, c, s_g), **space) for f, c in pairs],
        [make_residual_norm(f, **space) for f, _ in pairs],
        nn.Sequential(nn.Conv2d(12, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)) if connector else None,
        coarsest_mutates_input=coarsest_mutates_input,
    )
    return _randomise_(block)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("connector", [False, True], ids=["", "connector"])
@pytest.mark.parametrize("coarsest_mutates_input", [False, True], ids=["", "mutating-coarsest"])
def test_forward_with_autograd_is_the_reference_with_its_gradients(training, connector, coarsest_mutates_input):
    torch.manual_seed(0)
    block = _random_mgic(connector, coarsest_mutates_input).train(training)
    x = torch.randn(3, 12 if connector else 32, 6, 6, requires_grad=True)
    ref = reference_forward(block, x)
    finest_alone = block.levels[0](block.connector(x) if connector else x)
    assert not torch.allclose(ref, finest_alone)  # the coarse levels contribute: not a vacuous comparison
    got = block(x)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    params = list(block.parameters())
    for a, b in zip(torch.autograd.grad(got, [x, *params], g), torch.autograd.grad(ref, [x, *params], g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("connector", [False, True], ids=["", "connector"])
@pytest.mark.parametrize("coarsest_mutates_input", [False, True], ids=["", "mutating-coarsest"])
@pytest.mark.parametrize("overwrite_input", [False, True], ids=["", "overwrite_input"])
def test_in_place_fast_path_is_the_reference(grad_mode, training, connector, coarsest_mutates_input, overwrite_input):
    """Without autograd the block computes in place (its own maps, and its input if allowed): same result."""
    torch.manual_seed(0)
    block = _random_mgic(connector, coarsest_mutates_input).train(training)
    x = torch.randn(3, 12 if connector else 32, 6, 6)
    with torch.no_grad():
        ref = reference_forward(block, x.clone())
    arg = x.clone()
    with grad_mode():
        got = block(arg, overwrite_input=overwrite_input)
    torch.testing.assert_close(got, ref)
    if overwrite_input and not connector:  # the in-place path did run: the finest correction went into the input
        assert got.data_ptr() != arg.data_ptr() and not torch.equal(arg, x)
    else:  # the caller's tensor is never written otherwise (a connector's output is the block's own)
        torch.testing.assert_close(arg, x, rtol=0, atol=0)


# --------------------------------------------------------------------------- fewer ops, same layer


def aten_ops(fn) -> int:
    """``aten::`` events torch.profiler records for one call of ``fn`` (nested calls included): deterministic."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("aten::") for e in prof.events())


@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_at_batch_one_is_two_views_and_a_bmm(bias):
    """One image: view the input, one ``bmm`` (3 events with its two ``resolve_conj``), view the output.

    The weight's ``(G, o, i)`` view is cached after the first call (``aten_ops`` calls once unprofiled).
    The former ``flatten``/``unflatten`` chain took 17 events; a bias adds its ``view`` and ``add_``.
    """
    layer = POINTWISE_BY_DIMS[2](64, 32, 4, bias=bias)
    x = torch.randn(1, 64, 7, 7)
    with torch.no_grad():
        assert aten_ops(lambda: layer(x)) == 5 + 2 * bias


def test_pointwise_conv_weight_stays_the_conv_weight_through_training_and_conversion():
    """The ``(G, o, i)`` view is taken per call: right after an optimizer step, ``load_state_dict`` and ``.to()``."""
    torch.manual_seed(0)
    fast = POINTWISE_BY_DIMS[2](16, 8, 4, bias=True)
    assert fast.weight.shape == (8, 4, 1, 1) and set(fast.state_dict()) == {"weight", "bias"}
    conv = nn.Conv2d(16, 8, 1, groups=4)
    fast.load_state_dict(conv.state_dict())  # a plain conv's state_dict loads, and the other way round
    conv.load_state_dict(fast.state_dict())
    x = torch.randn(2, 16, 5, 5)
    opt = torch.optim.SGD(fast.parameters(), lr=0.5)
    fast(x).square().sum().backward()
    opt.step()
    assert not torch.allclose(fast.weight, conv.weight)  # the step changed the weights in place
    torch.testing.assert_close(fast(x), F.conv2d(x, fast.weight, fast.bias, groups=4))
    fast.to(torch.float64)
    torch.testing.assert_close(fast(x.double()), F.conv2d(x.double(), fast.weight, fast.bias, groups=4))


@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_conv_under_torch_compile_does_not_branch_on_the_batch(batch):
    """Compiled, the layer is one ``matmul`` whatever the batch (no guard on ``N == 1``), and computes the conv."""
    torch._dynamo.reset()
    layer = POINTWISE_BY_DIMS[2](16, 8, 4).eval()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(batch, 16, 5, 5)
    with torch.no_grad():
        out = torch.compile(layer, backend=record, dynamic=False)(x)
    torch.testing.assert_close(out, F.conv2d(x, layer.weight, layer.bias, groups=4))
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.matmul in targets and torch.bmm not in targets, targets


def test_pointwise_conv_weight_view_cache_is_never_stale():
    """The cached ``(G, o, i)`` view follows every way a weight can change, and every grad mode."""
    import pickle

    torch.manual_seed(0)
    layer = POINTWISE_BY_DIMS[2](16, 8, 4, bias=False)
    x = torch.randn(1, 16, 3, 3)

    def check():
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, None, groups=4), rtol=0, atol=1e-6)

    with torch.no_grad():
        check()  # cached without autograd ...
    y = layer(x)  # ... then used with it: must rebuild, or the weight would get no gradient
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight.mul_(2)  # in place (an optimizer step): the view shows it
    check()
    layer.weight.data = torch.randn(8, 4, 1, 1)  # new memory behind the same Parameter
    check()
    layer.weight = nn.Parameter(torch.randn(8, 4, 1, 1))  # a new Parameter
    check()
    layer.weight.requires_grad_(False)  # frozen: no graph may lead into the weight
    assert not layer(x).requires_grad
    layer.load_state_dict({"weight": torch.randn(8, 4, 1, 1)})
    check()
    copied = pickle.loads(pickle.dumps(layer))  # torch.save / deepcopy carry no cache
    assert "_weight_view" not in copied.__dict__ and "_weight_view" in layer.__dict__
    torch.testing.assert_close(copied(x), layer(x))
    params = {"weight": torch.randn(8, 4, 1, 1)}  # torch.func substitutes tensors: used, never cached
    torch.testing.assert_close(torch.func.functional_call(layer, params, (x,)), F.conv2d(x, params["weight"], groups=4))
    check()


def _random_mgic_nd(dims, widths=(32, 16, 8), s_g=4):
    """Like ``_random_mgic``, for 1-, 2- or 3-d maps: grouped conv-BN-ReLU levels, random weights and statistics."""
    conv, bn = CONV_BY_DIMS[dims], {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    space = {"spatial_dims": dims, "channels_last": False}
    pairs = list(zip(widths, widths[1:]))
    levels = [nn.Sequential(conv(c, c, 3, padding=1, groups=max(1, c // s_g) if c != widths[-1] else 1), bn(c), nn.ReLU())
              for c in widths]
    block = MGICBlock(levels,
                      [make_transfer(f, c, transfer_groups(f, c, s_g), **space) for f, c in pairs],
                      [make_transfer(c, f, transfer_groups(f, c, s_g), **space) for f, c in pairs],
                      [make_residual_norm(f, **space) for f, _ in pairs])
    with torch.no_grad():
        for m in block.modules():
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn_like(p) * 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return block


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dims, layout", [(1, "nchw"), (2, "nchw"), (2, "channels_last"), (3, "nchw")])
def test_fast_inference_path_is_the_reference_in_every_layout(dims, layout, batch, grad_mode):
    """The eval fast path (grouped 1x1 as ``bmm``, ``N_j`` as one ``addcmul``, in-place residuals) computes Algorithm 1.

    1-, 2- and 3-d maps, channels-last (the grouped 1x1 then runs PyTorch's conv), one image and several.
    """
    torch.manual_seed(0)
    block = _random_mgic_nd(dims).eval()
    x = torch.randn(batch, 32, *(6,) * dims)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = reference_forward(block, x.clone())
    assert not torch.allclose(ref, block.levels[0](x))  # the coarse levels contribute
    with grad_mode():
        got = block(x.clone(), overwrite_input=True)
    torch.testing.assert_close(got, ref)


def test_hooks_on_the_machinery_fire_and_see_what_the_modules_computed():
    """A hook on ``N_j`` (or ``P_j``) sends the block to the module path: the hook fires and keeps its tensor intact."""
    torch.manual_seed(0)
    block = _random_mgic_nd(2).eval()
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        ref = reference_forward(block, x.clone())
    kept = {}

    def keep(name):
        def hook(module, args, out):
            kept[name] = (out, out.clone())  # returns None: the output is not replaced
        return hook

    handles = [block.norms[0].register_forward_hook(keep("n0")), block.prolong[1].register_forward_hook(keep("p1"))]
    with torch.inference_mode():
        got = block(x.clone(), overwrite_input=True)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, ref)
    assert set(kept) == {"n0", "p1"}
    for out, snapshot in kept.values():  # nobody wrote into a tensor a hook holds
        torch.testing.assert_close(out, snapshot, rtol=0, atol=0)


def test_transformed_network_survives_state_dict_and_torch_save_with_the_fast_paths_warm(tmp_path):
    """After inference calls (weight views cached), ``state_dict`` and ``torch.save`` round trips give the same network."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = mt.mgicify(_Bottleneck(32), x, group_size=4, coarsest_width=8).eval()
    with torch.no_grad():
        for n in (m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            n.weight.uniform_(0.5, 1.5)  # N_j on: the corrections count
        ref = gm(x)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False).eval()
    assert not any("_weight_view" in m.__dict__ for m in loaded.modules())
    fresh = mt.mgicify(_Bottleneck(32), x, group_size=4, coarsest_width=8).eval()
    fresh.load_state_dict(gm.state_dict())
    assert gm.state_dict().keys() == fresh.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["", "checkpoint"])
@pytest.mark.parametrize("rule", ["paper", "compact"])
def test_every_block_of_a_transformed_network_computes_algorithm_1(rule, checkpoint):
    """Under both rules, with and without checkpointing: each rewritten block's output and gradients (train mode),
    and its eval output without autograd (the fast path), equal ``reference_forward``'s."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    gm = mt.mgicify(_Bottleneck(64), x, group_size=4, coarsest_width=8, rule=rule, checkpoint=checkpoint)
    blocks = [gm.get_submodule(d.module) for d in gm.meta["mgic"].rewritten]
    assert blocks and all(b.checkpoint is checkpoint for b in blocks)
    for block in blocks:
        _randomise_(block)
        c_in = block.connector[0].in_channels if block.connector is not None else block.restrict[0].in_channels
        inp = torch.randn(3, c_in, 8, 8, requires_grad=True)
        block.train()
        params = list(block.parameters())
        ref = reference_forward(block, inp)  # each forward is followed by its own backward: a checkpointed block
        g = torch.randn_like(ref)  # recomputes in its backward, and must see the buffers as its forward left them
        ref_grads = torch.autograd.grad(ref, [inp, *params], g)
        got = block(inp)
        torch.testing.assert_close(got, ref)
        for a, b in zip(torch.autograd.grad(got, [inp, *params], g), ref_grads):
            torch.testing.assert_close(a, b)
        block.eval()
        with torch.no_grad():
            want = reference_forward(block, inp.detach().clone())
        with torch.inference_mode():
            torch.testing.assert_close(block(inp.detach().clone(), overwrite_input=True), want)
