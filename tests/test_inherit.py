"""``mgicify(trained, x, init="inherit")``: every level built from the trained block (Galerkin products).

The coarsest level is ``R W P`` computed by hand; every grouped level is the block-diagonal part
of its restricted weight; a trained block whose weights already are block-diagonal is reproduced
exactly by the finest level; the zoo models train with inherited weights; what cannot be mapped
falls back to scratch and the plan says why.
"""

import pytest
import torch
import torchvision
from torch import nn

import mgic_transform as mt
from mgic_transform.errors import ConfigError
from mgic_transform.nn import MGICBlock
from mgic_transform.passes.inherit import LayerInit, coarsening, galerkin, set_correction_scale, transfer_matrix
from custom_models import CUSTOM_MODELS


def _aggregate(n: int, m: int) -> torch.Tensor:
    """Averaging of n/m consecutive channels, written out by hand (m divides n)."""
    R = torch.zeros(m, n, dtype=torch.float64)
    k = n // m
    for i in range(m):
        R[i, i * k:(i + 1) * k] = 1.0 / k
    return R


def _blocks(M: torch.Tensor, groups: int) -> list[torch.Tensor]:
    o, i = M.shape[0] // groups, M.shape[1] // groups
    return [M[t * o:(t + 1) * o, t * i:(t + 1) * i] for t in range(groups)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_coarsening_pair():
    R, P = coarsening(6, 3)
    assert torch.equal(R, _aggregate(6, 3))
    assert torch.equal(R @ P, torch.eye(3, dtype=torch.float64))
    R, P = coarsening(3, 6)  # growing: copies out, averages back
    assert torch.equal(P @ R, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(R.sum(1), torch.ones(6, dtype=torch.float64))


def test_linear_block_coarsest_level_is_the_galerkin_product():
    model = _mlp()
    gm = mt.mgicify(model, torch.randn(4, 16), group_size=8, coarsest_width=16, init="inherit")
    (d,) = gm.meta["mgic"].rewritten
    c_L = d.levels[-1]
    assert d.levels[0] == 64 and len(d.levels) >= 3 and c_L <= 16
    block = gm.get_submodule(d.module)
    W, b = model[2].weight.detach().double(), model[2].bias.detach().double()
    R, P = _aggregate(64, c_L), _aggregate(64, c_L).T * (64 // c_L)  # average consecutive channels / copy back
    coarsest = block.levels[-1].get_submodule("2")
    assert isinstance(coarsest, nn.Linear) and coarsest.weight.shape == (c_L, c_L)
    torch.testing.assert_close(coarsest.weight.double(), R @ W @ P, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(coarsest.bias.double(), R @ b, rtol=1e-6, atol=1e-6)
    # ... and R / P are the aggregation the products were taken with
    R_prod, P_prod = torch.eye(64, dtype=torch.float64), torch.eye(64, dtype=torch.float64)
    for r, p in zip(block.restrict, block.prolong):
        R_prod, P_prod = transfer_matrix(r) @ R_prod, P_prod @ transfer_matrix(p)
    torch.testing.assert_close(R_prod, R)
    torch.testing.assert_close(P_prod, P)
    assert d.init == (LayerInit("2", True, None),)


def test_every_level_is_the_block_diagonal_part_of_its_restricted_weight():
    model = _mlp()
    gm = mt.mgicify(model, torch.randn(4, 16), group_size=8, coarsest_width=16, init="inherit")
    (d,) = gm.meta["mgic"].rewritten
    block = gm.get_submodule(d.module)
    W = model[2].weight.detach().double()
    for j, (width, groups) in enumerate(zip(d.levels, d.groups)):
        R = _aggregate(64, width)
        restricted = R @ W @ (R.T * (64 // width))
        layer = block.levels[j].get_submodule("2")
        w = layer.weight.detach().double()
        got = list(w) if groups > 1 else [w]  # GroupedLinear: (G, out/G, in/G)
        assert len(got) == groups
        for have, want in zip(got, _blocks(restricted, groups)):
            torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-6)
    # the finest level is the block-diagonal part of the trained weight itself
    torch.testing.assert_close(block.levels[0].get_submodule("2").weight.detach().double(),
                               torch.stack(_blocks(W, d.groups[0])), rtol=1e-6, atol=1e-6)


def test_galerkin_matches_the_dense_product_for_grouped_and_depthwise_weights():
    torch.manual_seed(0)
    for o, i, gs, k, o2, i2, G in [(8, 12, 1, (3,), 4, 6, 2), (12, 12, 12, (3, 3), 6, 6, 6), (24, 12, 12, (3,), 12, 6, 6),
                                   (16, 16, 4, (), 8, 8, 2), (16, 16, 4, (1, 1, 1), 8, 8, 1)]:
        w = torch.randn(o, i // gs, *k, dtype=torch.float64)
        R, P = torch.rand(o2, o, dtype=torch.float64), torch.rand(i, i2, dtype=torch.float64)
        dense = torch.zeros(o, i, *k, dtype=torch.float64)
        for g in range(gs):
            dense[g * (o // gs):(g + 1) * (o // gs), g * (i // gs):(g + 1) * (i // gs)] = w[g * (o // gs):(g + 1) * (o // gs)]
        full = torch.einsum("po,oi...,ij->pj...", R, dense, P)
        want = torch.cat(_blocks(full, G))
        torch.testing.assert_close(galerkin(w, gs, R, P, G), want)


class _ConvBlockNet(nn.Module):
    """stem -> residual unit (1x1 expand, depthwise, norm, 1x1 project, norm) -> head, in 1/2/3 d."""

    def __init__(self, dims: int, norm: str, c: int = 32) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        make_norm = {"bn": lambda n: bn(n), "gn": lambda n: nn.GroupNorm(4, n)}[norm]
        self.stem = conv(3, c, 3, padding=1)
        self.expand = conv(c, 2 * c, 1)
        self.n1 = make_norm(2 * c)
        self.dw = conv(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.n2 = make_norm(2 * c)
        self.project = conv(2 * c, c, 1, bias=False)
        self.n3 = make_norm(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.n3(self.project(torch.relu(self.n2(self.dw(torch.relu(self.n1(self.expand(x))))))))
        return self.head(x.flatten(2).mean(-1))


class _LNMixer(nn.Module):
    """Channels-last residual MLP with LayerNorm: Linear / LayerNorm blocks."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, c)
        self.ln = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.head(x.mean(1))


_SHAPES = {1: (4, 3, 16), 2: (4, 3, 8, 8), 3: (4, 3, 4, 6, 6)}


def _perturb_(model: nn.Module) -> None:
    """Trained-looking norms: statistics and affine parameters away from their defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def _level0_groups(gm, d) -> dict:
    """The group count of every channel-mixing layer at the finest level, read off the MGIC block."""
    level = gm.get_submodule(d.module).levels[0]
    return {n.target: level.get_submodule(n.target).groups for n in level.graph.nodes
            if n.op == "call_module" and hasattr(level.get_submodule(n.target), "groups")}


def _block_diagonal_(model: nn.Module, groups: dict) -> None:
    """Zero every dense channel-mixing weight outside ``groups[name]`` diagonal blocks (depthwise ones already are)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name not in groups or not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            if isinstance(m, nn.Linear) or m.groups == 1:
                g = groups[name]
                o, i = m.weight.shape[:2]
                mask = torch.block_diag(*[torch.ones(o // g, i // g)] * g)
                m.weight.mul_(mask.reshape(o, i, *[1] * (m.weight.dim() - 2)))


@pytest.mark.parametrize("dims,norm", [(1, "bn"), (2, "bn"), (3, "bn"), (2, "gn")])
def test_finest_level_reproduces_a_block_diagonal_trained_block(dims, norm):
    """With N_j = 0 the MGIC block is its finest level; a trained block that is block-diagonal already is exact."""
    torch.manual_seed(0)
    model = _ConvBlockNet(dims, norm, c=64 if dims == 3 else 32)
    _perturb_(model)
    model.eval()
    x = torch.randn(*_SHAPES[dims])
    scratch = mt.mgicify(model, x, group_size=8, coarsest_width=8)
    (d,) = scratch.meta["mgic"].rewritten
    groups = _level0_groups(scratch, d)
    assert len(d.levels) >= 3 and groups["expand"] > 1 and groups["project"] > 1
    _block_diagonal_(model, groups)
    gm = mt.mgicify(model, x, group_size=8, coarsest_width=8, init="inherit")
    (d,) = gm.meta["mgic"].rewritten
    assert all(r.inherited for r in d.init) and {r.layer for r in d.init} >= {"expand", "n1", "dw", "n2", "project", "n3"}
    set_correction_scale(gm, 0.0)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    # scratch init does not: the test can fail
    set_correction_scale(scratch, 0.0)
    with torch.no_grad():
        assert not torch.allclose(scratch.eval()(x), model(x), atol=1e-3)


def test_depthwise_and_norms_are_restricted_at_the_coarse_levels():
    torch.manual_seed(0)
    model = _ConvBlockNet(2, "bn")
    _perturb_(model)
    gm = mt.mgicify(model, torch.randn(2, 3, 8, 8), group_size=8, coarsest_width=8, init="inherit")
    (d,) = gm.meta["mgic"].rewritten
    block = gm.get_submodule(d.module)
    for j, level in enumerate(block.levels):
        inner = level.get_submodule("dw").in_channels
        R = _aggregate(64, inner)
        torch.testing.assert_close(level.get_submodule("dw").weight.detach().double().flatten(1),
                                   R @ model.dw.weight.detach().double().flatten(1))  # kernels averaged
        for name in ("running_mean", "running_var", "weight", "bias"):
            torch.testing.assert_close(getattr(level.get_submodule("n2"), name).detach().double(),
                                       R @ getattr(model.n2, name).detach().double())
        torch.testing.assert_close(level.get_submodule("n2").num_batches_tracked, model.n2.num_batches_tracked)


def test_layernorm_and_channels_last_linear_blocks_inherit():
    torch.manual_seed(0)
    model = _LNMixer()
    _perturb_(model)
    x = torch.randn(2, 5, 8)
    scratch = mt.mgicify(model, x, group_size=8, coarsest_width=8)
    _block_diagonal_(model, _level0_groups(scratch, scratch.meta["mgic"].rewritten[0]))
    gm = mt.mgicify(model, x, group_size=8, coarsest_width=8, init="inherit")
    (d,) = gm.meta["mgic"].rewritten
    assert all(r.inherited for r in d.init) and {r.layer for r in d.init} == {"ln", "fc1", "fc2"}
    set_correction_scale(gm, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    coarse = gm.get_submodule(d.module).levels[-1]
    R = _aggregate(32, coarse.get_submodule("ln").normalized_shape[0])
    torch.testing.assert_close(coarse.get_submodule("ln").weight.detach().double(), R @ model.ln.weight.detach().double())


def test_correction_scale_sets_every_norm():
    gm = mt.mgicify(_mlp(), torch.randn(4, 16), group_size=8, coarsest_width=16, init="inherit")
    set_correction_scale(gm, 0.25)
    norms = [n for m in gm.modules() if isinstance(m, MGICBlock) for n in m.norms]
    assert norms and all(torch.all(n.weight == 0.25) for n in norms)


def test_transition_blocks_fall_back_to_scratch_and_say_why():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(8, shortcut="B", widths=(16, 32, 64))
    gm = mt.mgicify(model, torch.randn(2, 3, 32, 32), group_size=8, coarsest_width=16, transitions=True, init="inherit")
    transitions = [d for d in gm.meta["mgic"].rewritten if d.kind == "transition"]
    assert transitions
    for d in transitions:
        assert d.init and not any(r.inherited for r in d.init)
        assert all("width-changing" in r.reason for r in d.init)


def test_scratch_is_the_default_and_records_nothing():
    gm = mt.mgicify(_mlp(), torch.randn(4, 16), group_size=8, coarsest_width=16)
    assert all(d.init == () for d in gm.meta["mgic"].blocks)


def test_bad_init_is_a_config_error():
    with pytest.raises(ConfigError, match="init must be one of 'scratch', 'inherit', 'calibrate'"):
        mt.mgicify(_mlp(), torch.randn(4, 16), init="galerkin")


def test_plan_with_init_records_serialises():
    import json

    gm = mt.mgicify(_mlp(), torch.randn(4, 16), group_size=8, coarsest_width=16, init="inherit")
    d = json.loads(json.dumps(gm.meta["mgic"].to_dict()))
    assert d["blocks"][0]["init"] == [{"layer": "2", "inherited": True, "reason": None}]


ZOO = {
    "resnet18": (torchvision.models.resnet18, (2, 3, 64, 64), 32, 64),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, (2, 3, 64, 64), 16, 32),
    **CUSTOM_MODELS,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_train_with_inherited_weights(name):
    ctor, shape, s_g, s_c = ZOO[name]
    torch.manual_seed(0)
    model = ctor()
    _perturb_(model)
    x = torch.randn(*shape)
    gm = mt.mgicify(model, x, group_size=s_g, coarsest_width=s_c, init="inherit")
    plan = gm.meta["mgic"]
    assert plan.rewritten
    for d in plan.rewritten:
        assert d.init, d.path
        assert all(r.inherited or r.reason for r in d.init)
        assert any(r.inherited for r in d.init), [(r.layer, r.reason) for r in d.init]
    with torch.no_grad():
        assert gm.eval()(x).shape == model.eval()(x).shape
    gm.train()
    loss = gm(x).float().pow(2).mean()
    loss.backward()
    for d in plan.rewritten:
        for pname, p in gm.get_submodule(d.module).named_parameters():
            assert p.grad is not None, f"{d.module}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all() and torch.isfinite(p).all()


def test_a_parameter_budget_search_inherits_too():
    model = _mlp()
    gm = mt.mgicify(model, torch.randn(4, 16), target_params=0.9, init="inherit")
    rewritten = gm.meta["mgic"].rewritten
    assert rewritten and all(d.init and all(r.inherited for r in d.init) for d in rewritten)


def test_the_layer_table_says_how_each_layer_is_inherited():
    """``init="inherit"`` reads the one table of layer knowledge (``layers.LayerRule.inherit``)."""
    from mgic_transform.layers import inheritance_kind
    from mgic_transform.nn.transfer import GroupedLinear, PointwiseConv2d

    kinds = {
        nn.Conv1d(4, 4, 3): "conv", nn.Conv2d(4, 4, 3, groups=2): "conv", PointwiseConv2d(4, 8, 2): "conv",
        nn.Linear(4, 4): "linear", GroupedLinear(4, 4, 2): "linear",
        nn.BatchNorm2d(4): "norm", nn.GroupNorm(2, 4): "norm", nn.LayerNorm(4): "norm", nn.PReLU(4): "norm",
        nn.InstanceNorm2d(4, affine=True): "norm",
        nn.ConvTranspose2d(4, 4, 2): None, nn.ReLU(): None, nn.Embedding(4, 4): None,
    }
    assert {type(m).__name__: inheritance_kind(m) for m in kinds} == {type(m).__name__: k for m, k in kinds.items()}
