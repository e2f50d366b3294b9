"""The transformed model works with the rest of PyTorch.

torch.save/torch.load (in a fresh process), state_dict round trips, copy.deepcopy,
torch.export, torch.compile, DistributedDataParallel (2 gloo ranks on CPU) and
train()/eval() switching. Models are tiny (8x8 images, widths 16-24) to keep the
file fast on two shared cores; the subprocess, DDP and compile tests are ``slow``.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mgic_transform as mt
from mgic_transform.nn import MGICBlock

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Unit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    """stem -> two residual units (rewritten into 3-level MGIC blocks) -> dropout -> linear."""

    def __init__(self, c: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = Unit(c)
        self.layer2 = Unit(c)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(self.drop(x.mean((2, 3))))


OPTS = dict(group_size=4, coarsest_width=6, rule="compact")  # widths 24 -> 12 -> 6 (outer width halved)
SHAPE = (2, 3, 8, 8)


def _make(seed: int = 0, *, train: bool = False) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = Net()
    torch.manual_seed(seed)
    gm = mt.mgicify(model, torch.randn(*SHAPE), **OPTS)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["layer1", "layer2"]
    return gm.train(train)


def _batch(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def _train_step(gm, x, lr=0.1):
    """One SGD step in train mode, so weights *and* BN running statistics move away from their init."""
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=lr)
    opt.zero_grad()
    gm(x).pow(2).mean().backward()
    opt.step()
    return gm


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _batchnorms(gm):
    return [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --------------------------------------------------------------------------- torch.save / torch.load


def test_save_load_round_trip_in_process():
    gm = _train_step(_make(), _batch(2)).eval()
    x = _batch()
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, torch.fx.GraphModule) and not loaded.training
    assert isinstance(loaded.get_submodule("layer1"), MGICBlock)
    _assert_same_state(gm, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


@pytest.mark.slow
def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    """A fresh interpreter needs neither this test module nor an explicit ``import mgic_transform``."""
    gm = _train_step(_make(), _batch(2)).eval()
    x = _batch()
    with torch.no_grad():
        expected = gm(x)
    torch.save(gm, tmp_path / "gm.pt")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        """
        import sys, torch
        torch.set_num_threads(1)
        d = sys.argv[1]
        gm = torch.load(d + "/gm.pt", weights_only=False)
        x = torch.load(d + "/x.pt")
        assert "mgic_transform" in sys.modules  # pulled in by unpickling the MGIC blocks
        with torch.no_grad():
            torch.save({"out": gm(x), "training": gm.training, "types": sorted({type(m).__name__ for m in gm.modules()})},
                       d + "/out.pt")
        """
    )
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = torch.load(tmp_path / "out.pt")
    assert torch.equal(result["out"], expected)
    assert result["training"] is False
    assert "MGICBlock" in result["types"]


def test_report_of_a_reloaded_model_is_the_same_report():
    """torch.load empties gm.meta; the plan survives beside it, so compare() gives the same rows and totals."""
    torch.manual_seed(0)
    model = Net()
    gm = mt.mgicify(model, torch.randn(*SHAPE), **OPTS)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh, reloaded = mt.compare(model, gm, torch.randn(*SHAPE)).to_dict(), mt.compare(model, loaded, torch.randn(*SHAPE)).to_dict()
    for key in ("params_before", "params_after", "flops_before", "flops_after"):
        assert fresh[key] == reloaded[key], key
    assert fresh["params_after"] < fresh["params_before"]
    assert len(fresh["blocks"]) == 2
    assert reloaded["blocks"] == fresh["blocks"]
    assert mt.compare(model, loaded).to_dict() == mt.compare(model, gm).to_dict()  # the example input survives too


# --------------------------------------------------------------------------- state_dict


def test_state_dict_round_trip_into_a_second_transform():
    trained = _train_step(_make(seed=0), _batch(2)).eval()
    fresh = _make(seed=0).eval()
    # same seed -> same structure and the same initial weights (see test_determinism.py for more)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}
    x = _batch()
    with torch.no_grad():
        assert not torch.equal(fresh(x), trained(x))  # the training step changed something
    result = fresh.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(fresh, trained)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_state_dict_loads_into_a_transform_with_another_seed():
    """Only the values depend on the seed: a checkpoint loads into any transform of the same model and options."""
    a, b = _make(seed=0).eval(), _make(seed=123).eval()
    assert not torch.equal(a.get_submodule("layer1.restrict.0").weight, b.get_submodule("layer1.restrict.0").weight)
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(a(_batch()), b(_batch()))


def test_state_dict_keys_follow_the_original_module_paths():
    keys = set(_make().state_dict())
    assert {"stem.0.weight", "head.weight", "head.bias"} <= keys
    assert any(k.startswith("layer1.levels.0.") for k in keys)
    assert any(k.startswith("layer2.restrict.1.") for k in keys)
    assert not any(k.startswith("layer1.conv1") for k in keys)  # the original unit is gone


def test_state_dict_of_the_original_model_is_rejected_loudly():
    torch.manual_seed(0)
    original = Net()
    gm = _make()
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        gm.load_state_dict(original.state_dict(), strict=True)


# --------------------------------------------------------------------------- copy.deepcopy


def test_deepcopy():
    gm = _train_step(_make(), _batch(2)).eval()
    clone = copy.deepcopy(gm)
    x = _batch()
    with torch.no_grad():
        assert torch.equal(clone(x), gm(x))
    _assert_same_state(gm, clone)
    assert not any(p is q for p in clone.parameters() for q in gm.parameters())
    assert clone.meta["mgic"] == gm.meta["mgic"]
    assert clone.code == gm.code
    # training the copy leaves the original alone
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    _train_step(clone, x)
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trained = clone.state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before if k.startswith("layer1.levels.0."))


# --------------------------------------------------------------------------- torch.export


def test_torch_export():
    gm = _train_step(_make(), _batch(2)).eval()
    x = _batch()
    ep = torch.export.export(gm, (x,))
    exported = ep.module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), gm(x), rtol=1e-5, atol=1e-6)
        other = _batch(7)  # other values, same shape
        torch.testing.assert_close(exported(other), gm(other), rtol=1e-5, atol=1e-6)
    convs = [n for n in ep.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) >= 2 + 2 * 3  # stem + per unit 2 convs at each of the 3 levels (+ transfers)


def test_torch_export_with_a_dynamic_batch():
    gm = _make().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(gm, (_batch(n=2),), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        x = _batch(n=n)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), gm(x), rtol=1e-5, atol=1e-6)


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_cxx(), reason="torch.compile (inductor, CPU) needs a C++ compiler")
def test_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net(c=8)
    gm = mt.mgicify(model, torch.randn(*SHAPE), group_size=4, coarsest_width=4).eval()  # 8 -> 4: two levels
    assert gm.meta["mgic"].rewritten
    compiled = torch.compile(gm)
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- train() / eval()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_training_flag_of_layers_and_mgic_blocks_follows_the_input_model(train):
    torch.manual_seed(0)
    gm = mt.mgicify(Net().train(train), torch.randn(*SHAPE), **OPTS)
    assert gm.training == train
    leaves = [m for m in gm.modules() if not list(m.children())]
    assert {m.training for m in leaves} == {train}
    for d in gm.meta["mgic"].rewritten:
        assert {m.training for m in gm.get_submodule(d.module).modules()} == {train}


def test_per_module_flags_outside_rewritten_blocks_are_kept():
    """A frozen BatchNorm (eval inside a training model) stays frozen."""
    torch.manual_seed(0)
    model = Net().train()
    model.stem[1].eval()
    gm = mt.mgicify(model, torch.randn(*SHAPE), **OPTS)
    assert [n for n, m in gm.named_modules() if not m.training] == ["stem.1"]


# regression B13 (fixed): containers created by torch.fx for module paths started in train mode
def test_training_flags_follow_the_input_model_module_by_module():
    torch.manual_seed(0)
    model = Net().eval()
    gm = mt.mgicify(model, torch.randn(*SHAPE), **OPTS)
    paths = dict(model.named_modules())
    mismatched = [n for n, m in gm.named_modules() if n in paths and m.training != paths[n].training]
    assert mismatched == []
    assert not any(m.training for m in gm.modules())


def test_eval_is_deterministic_and_freezes_batchnorm():
    gm = _make().eval()
    assert not any(m.training for m in gm.modules())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    x = _batch()
    with torch.no_grad():
        y1, y2 = gm(x), gm(x)
    assert torch.equal(y1, y2)
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "an eval forward changed a buffer"


def test_train_updates_every_batchnorm_then_eval_uses_the_new_statistics():
    gm = _make().eval()
    x = _batch()
    with torch.no_grad():
        y_eval = gm(x)
    bns = _batchnorms(gm)
    mgic_bns = [m for b in (gm.layer1, gm.layer2) for m in _batchnorms(b)]
    assert len(mgic_bns) == 2 * (3 * 2 + 2)  # per block: 2 BNs at each of 3 levels + 2 residual norms N_j
    tracked = [int(m.num_batches_tracked) for m in bns]
    means = [m.running_mean.clone() for m in bns]

    gm.train()
    assert all(m.training for m in gm.modules())
    with torch.no_grad():
        gm(x)
    assert [int(m.num_batches_tracked) for m in bns] == [t + 1 for t in tracked]
    assert all(not torch.equal(m.running_mean, old) for m, old in zip(bns, means))

    gm.eval()
    with torch.no_grad():
        y_after = gm(x)
        assert torch.equal(gm(x), y_after)
    assert not torch.equal(y_after, y_eval)  # eval now uses the updated running statistics


def test_dropout_is_active_only_in_train():
    gm = _make()
    x = _batch()
    gm.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(2)
    b = gm(x)
    assert not torch.equal(a, b)
    gm.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        c = gm(x)
        torch.manual_seed(2)
        assert torch.equal(gm(x), c)


class Stochastic(nn.Module):
    """Reads ``self.training`` in forward: functional dropout, or torchvision's StochasticDepth (traced through)."""

    def __init__(self, kind: str, c: int = 16) -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(3, c, 1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        if kind == "stochastic_depth":
            torchvision = pytest.importorskip("torchvision")
            self.sd = torchvision.ops.StochasticDepth(0.5, "row")

    def forward(self, x):
        x = self.stem(x)
        if self.kind == "stochastic_depth":
            return x + self.sd(self.bn(self.conv(x)))
        x = x + self.bn(self.conv(x))
        return F.dropout(x, 0.5, self.training)


def _switches(gm, x):
    """(train output random, eval output deterministic)."""
    gm.train()
    with torch.no_grad():
        random_in_train = not torch.equal(gm(x), gm(x))
    gm.eval()
    with torch.no_grad():
        deterministic_in_eval = torch.equal(gm(x), gm(x))
    return random_in_train, deterministic_in_eval


@pytest.mark.parametrize("kind", ["dropout", "stochastic_depth"])
def test_stochastic_models_switch_modes_before_the_transform(kind):
    """The control for B21: the input model itself switches."""
    torch.manual_seed(0)
    assert _switches(Stochastic(kind), torch.randn(4, 3, 8, 8)) == (True, True)


# regression B21: torch.fx specialises ``self.training`` to the mode at trace time. Fixed in 3afb777 for
# submodules that read it (StochasticDepth is now a leaf), and for traced forwards (the root's own
# ``F.dropout(x, p, self.training)``) by tracing the flag as a graph value.


@pytest.mark.parametrize("traced_in", ["train", "eval"])
@pytest.mark.parametrize("kind", ["dropout", "stochastic_depth"])
def test_regression_training_flag_is_not_frozen_at_trace_time(kind, traced_in):
    torch.manual_seed(0)
    model = Stochastic(kind).train(traced_in == "train")
    x = torch.randn(4, 3, 8, 8)
    gm = mt.mgicify(model, x, group_size=4, coarsest_width=4)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]
    assert _switches(gm, x) == (True, True)


class BranchesOnTraining(Stochastic):
    """``if self.training:`` is Python control flow: it cannot become a graph value."""

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn(self.conv(x))
        if self.training:
            x = F.dropout(x, 0.5)
        return x


def test_root_forward_branching_on_self_training_warns():
    """Control flow on self.training is fixed to the mode at transform time; the user is told, and how to get the other."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="self.training") as record:
        gm = mt.mgicify(BranchesOnTraining("dropout").train(), torch.randn(4, 3, 8, 8), group_size=4, coarsest_width=4)
    msg = " ".join(str(w.message) for w in record if "self.training" in str(w.message))
    assert "train mode" in msg and "eval()" in msg
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["conv"]


def test_a_forward_passing_self_training_as_a_value_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = mt.mgicify(Stochastic("dropout").train(), torch.randn(4, 3, 8, 8), group_size=4, coarsest_width=4)
    assert "training" in gm.code or any("training" in m.code for m in gm.modules()
                                        if isinstance(m, torch.fx.GraphModule))


# --------------------------------------------------------------------------- dtype / memory format


def test_to_double_and_channels_last():
    gm = _train_step(_make(), _batch(2)).eval()
    x = _batch()
    with torch.no_grad():
        ref = gm(x)
        d = copy.deepcopy(gm).double()
        torch.testing.assert_close(d(x.double()).float(), ref, rtol=1e-4, atol=1e-5)
        cl = copy.deepcopy(gm).to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- DistributedDataParallel


def _ddp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        gm = _make(seed=0, train=True)  # same seed on every rank: identical weights without a broadcast
        flat = torch.cat([p.detach().flatten() for p in gm.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks built different weights"

        x = _batch(seed=100 + rank)  # different data per rank
        local = copy.deepcopy(gm)
        torch.manual_seed(rank)  # the same dropout mask for the local and the DDP forward
        local(x).pow(2).mean().backward()
        local_grad = torch.cat([p.grad.flatten() for p in local.parameters()])

        ddp = nn.parallel.DistributedDataParallel(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(2):  # the second step fails if any parameter went unused in the first
            opt.zero_grad()
            torch.manual_seed(rank)
            ddp(x).pow(2).mean().backward()
            grad = torch.cat([p.grad.flatten() for p in gm.parameters()])
            if step == 0:
                first_grad = grad.clone()
            opt.step()
        params = torch.cat([p.detach().flatten() for p in gm.parameters()])
        torch.save({"local_grad": local_grad, "ddp_grad": first_grad, "params": params}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    ctx = mp.spawn(_ddp_worker, args=(world, f"file://{tmp_path}/init", str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):  # raises if a worker failed (its assertion or traceback is in the message)
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            pytest.fail("DDP workers did not finish within 180 s")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    local = [r["local_grad"] for r in results]
    assert not torch.allclose(local[0], local[1])  # the ranks saw different data
    expected = sum(local) / world
    for r in results:
        # DDP averages the gradients of all ranks ...
        torch.testing.assert_close(r["ddp_grad"], expected, rtol=1e-4, atol=1e-6)
    # ... so every rank holds the same gradient and, after two steps, the same weights
    assert torch.equal(results[0]["ddp_grad"], results[1]["ddp_grad"])
    assert torch.equal(results[0]["params"], results[1]["params"])
