"""``mt.calibrate``: every MGIC block fitted to the trained network's own activations (issue 19).

The errors are measured here independently of the pass (forward hooks on the original and on the
transformed network), on the calibration inputs and on held-out inputs; the test that the fit
happened at all is shown to fail when the fitting step is a no-op.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import warnings

import pytest
import torch
from torch import nn

import mgic_transform as mt
import mgic_transform.passes.calibrate as calibration
from mgic_transform.errors import InputError, MGICError
from mgic_transform.plan import BlockFit

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


class Block(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, c: int, dims: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = CONV[dims](c, c, 3, padding=1, bias=False), BN[dims](c)
        self.conv2, self.bn2 = CONV[dims](c, c, 3, padding=1), BN[dims](c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    """A stem, three residual blocks nested in Sequential containers, a linear head."""

    def __init__(self, dims: int = 1, c: int = 16, in_ch: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(CONV[dims](in_ch, c, 3, padding=1), BN[dims](c), nn.ReLU())
        self.stages = nn.Sequential(nn.Sequential(Block(c, dims), Block(c, dims)), nn.Sequential(Block(c, dims)))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).flatten(2).mean(-1))


class TwoInputs(nn.Module):
    """``forward(x, bias)``: two tensor inputs, then a residual block."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, c, 3, padding=1)
        self.block = Block(c, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x, bias):
        return self.head(self.block(self.stem(x) + bias).mean(-1))


SHAPE = {1: (2, 12), 2: (2, 6, 6)}


def trained(model: nn.Module, dims: int = 1, seed: int = 0) -> nn.Module:
    """A model that looks trained: weights away from their init, BatchNorm statistics from data, eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
        model.train()
        for _ in range(3):
            model(*inputs(model, 32, dims, seed=seed + 100))
    return model.eval()


def inputs(model: nn.Module, n: int, dims: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE[dims], generator=g)
    return (x, torch.randn(n, 16, 1, generator=g)) if isinstance(model, TwoInputs) else (x,)


def transform(model: nn.Module, example: tuple[torch.Tensor, ...], init: str = "inherit") -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mt.mgicify(model, example, group_size=4, coarsest_width=4, rule="compact", init=init)


def block_errors(model: nn.Module, gm: torch.fx.GraphModule, xs: tuple[torch.Tensor, ...],
                 blocks: torch.fx.GraphModule | None = None) -> dict[str, float]:
    """``||MGIC(x) - y|| / ||y||`` per block, from hooks: ``x`` its input in ``gm``, ``y`` the original's output.

    ``blocks``: another transform of the same model whose MGIC blocks are run on those inputs instead.
    """
    errors = {}
    for d in gm.meta["mgic"].rewritten:
        seen = {}
        hooks = [model.get_submodule(d.path).register_forward_hook(lambda m, a, out: seen.update(y=out)),
                 gm.get_submodule(d.module).register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))]
        with torch.no_grad():
            model.eval()(*xs)
            gm.eval()(*xs)
            for h in hooks:
                h.remove()
            out = seen["out"] if blocks is None else blocks.get_submodule(d.module).eval()(seen["x"])
        errors[d.path] = ((out - seen["y"]).norm() / seen["y"].norm()).item()
    return errors


def assert_fitted(model, before: dict, gm, xs, held_out) -> None:
    """The assertion the fit must pass: every block's error well below where it started, on both sets of inputs."""
    after = block_errors(model, gm, xs)
    assert set(after) == set(before) and len(after) >= 3
    for path in before:
        assert after[path] < 0.7 * before[path], (path, before[path], after[path])
    held = block_errors(model, gm, held_out)
    assert all(held[p] < 0.85 * block_errors(model, before_gm(gm), held_out)[p] for p in held), held


def before_gm(gm):
    return gm.meta["uncalibrated"]


def calibrated(model, dims=1, init="inherit", **kw):
    """(gm before, gm after, calibration inputs, held-out inputs)."""
    xs, held = inputs(model, 96, dims, seed=1), inputs(model, 64, dims, seed=2)
    gm = transform(model, tuple(t[:2] for t in xs), init)
    gm.meta["uncalibrated"] = copy.deepcopy(gm)
    before = block_errors(model, gm, xs)
    kw = {"steps": 40, "network_steps": 0, "batch_size": 32, "progress": False, **kw}
    data = xs[0] if len(xs) == 1 else [xs]
    if kw.pop("_skip_refit", False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(calibration, "_refit", lambda *a, **k: None)
            mt.calibrate(gm, model, data, **kw)
    else:
        mt.calibrate(gm, model, data, **kw)
    return before, gm, xs, held


# ----------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("dims", [1, 2])
def test_calibration_lowers_every_blocks_error_against_the_original(dims):
    """The blocks' own fit (no network stage, so each block's inputs do not move after its fit)."""
    model = trained(Net(dims), dims)
    before, gm, xs, held = calibrated(model, dims, network_steps=0)
    assert_fitted(model, before, gm, xs, held)
    # the plan records the same errors the hooks measure, on both copies of the plan
    plan = gm.meta["mgic"]
    assert mt.plan_of(gm) is plan and gm._mgic_plan is plan
    measured = block_errors(model, gm, xs)
    started = block_errors(model, gm, xs, blocks=before_gm(gm))  # the starting weights, on the fitted inputs
    assert started[plan.rewritten[0].path] == pytest.approx(before[plan.rewritten[0].path], rel=1e-5)
    for d in plan.rewritten:
        assert isinstance(d.fit, BlockFit) and d.fit.samples == 96 and d.fit.steps == 40 and d.fit.seconds > 0
        assert d.fit.error_before == pytest.approx(started[d.path], rel=1e-3)
        assert d.fit.error_after == pytest.approx(measured[d.path], rel=1e-3)
    assert plan.to_dict()["blocks"][0]["fit"]["error_after"] == plan.rewritten[0].fit.error_after


def test_the_fit_test_fails_when_the_fit_is_skipped(monkeypatch):
    """``assert_fitted`` is not vacuous: with the fitting steps no-ops it fails."""
    monkeypatch.setattr(calibration, "_fit_block", lambda *a, **k: 0)
    monkeypatch.setattr(calibration, "_fit_network", lambda *a, **k: 0)
    model = trained(Net(1))
    before, gm, xs, held = calibrated(model)
    with pytest.raises(AssertionError):
        assert_fitted(model, before, gm, xs, held)


def network_error(model, gm, xs) -> float:
    with torch.no_grad():
        want = model.eval()(*xs)
        return ((gm.eval()(*xs) - want).norm() / want.norm()).item()


def test_the_network_stage_lowers_the_output_error_and_the_plan_reports_final_block_errors():
    model = trained(Net(1))
    _, blocks_only, xs, held = calibrated(model, network_steps=0)
    before, gm, _, _ = calibrated(model, network_steps=40)
    assert_fitted(model, before, gm, xs, held)
    assert network_error(model, gm, xs) < 0.9 * network_error(model, blocks_only, xs)
    assert network_error(model, gm, held) < network_error(model, blocks_only, held)
    plan = mt.plan_of(gm)
    (note,) = [n for n in plan.notes if n.startswith("calibrated: network output error ")]
    before_net, after_net = (float(v) for v in note.split("error ")[1].split(" (")[0].split(" -> "))
    assert after_net < before_net and after_net == pytest.approx(network_error(model, gm, xs), abs=2e-3)
    final = block_errors(model, gm, xs)
    assert all(d.fit.error_after == pytest.approx(final[d.path], rel=1e-3) for d in plan.rewritten)
    mt.calibrate(gm, model, xs[0], steps=2, network_steps=2, progress=False)  # calibrating again: one note
    assert sum(n.startswith("calibrated: ") for n in mt.plan_of(gm).notes) == 1


def test_after_calibration_train_mode_normalises_like_eval_mode():
    """The final statistics refit: with the MGIC blocks' norms in train mode (batch = the calibration set) the
    network computes what it computes in eval mode; without the refit it does not."""
    model = trained(Net(1))
    _, gm, xs, _ = calibrated(model, network_steps=10)
    _, unrefit, _, _ = calibrated(model, network_steps=10, _skip_refit=True)

    def gap(net):
        norms = [m for d in mt.plan_of(net).rewritten for m in calibration._running_norms(net.get_submodule(d.module))]
        with torch.no_grad():
            eval_out = net.eval()(*xs)
            for m in norms:
                m.train()
                m.momentum = 0.0  # batch statistics, running ones untouched
            train_out = net(*xs)
            for m in norms:
                m.eval()
                m.momentum = 0.1
        return ((train_out - eval_out).norm() / eval_out.norm()).item()

    assert gap(gm) < 2e-3 < 0.05 < gap(unrefit), (gap(gm), gap(unrefit))


def test_a_network_stage_that_raises_the_output_error_is_reverted(monkeypatch):
    model = trained(Net(1))
    _, blocks_only, xs, _ = calibrated(model, network_steps=0)

    def harmful(gm, blocks, *args, **kwargs):
        with torch.no_grad():
            for p in blocks[0].parameters():
                p.add_(1.0)
        return 7

    monkeypatch.setattr(calibration, "_fit_network", harmful)
    _, gm, _, _ = calibrated(model, network_steps=7)
    (note,) = [n for n in mt.plan_of(gm).notes if n.startswith("calibrated: ")]
    assert "reverted" in note and "(7 Adam steps" in note
    assert all(torch.equal(v, blocks_only.state_dict()[k]) for k, v in gm.state_dict().items())


def test_least_squares_recovers_a_finest_level_that_can_hold_the_trained_block_exactly():
    """Trained convolutions block-diagonal under the finest level's groups, inherited, then the finest level's weights
    scrambled: the closed form puts them back (error ~0) without any Adam step; Adam alone only gets closer."""
    model = Net(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv1d) and m.in_channels == m.out_channels:
                o, i = m.weight.shape[:2]
                m.weight.mul_(torch.block_diag(*[torch.ones(o // 4, i // 4)] * 4)[..., None])
    model = trained(model)
    xs = inputs(model, 96, seed=1)
    errors = {}
    for least_squares, steps in ((True, 0), (False, 40)):
        gm = transform(model, (xs[0][:2],))
        assert max(block_errors(model, gm, xs).values()) < 1e-5  # inheritance alone is exact here
        with torch.no_grad():
            for d in gm.meta["mgic"].rewritten:
                for m in gm.get_submodule(d.module).levels[0].modules():
                    if isinstance(m, nn.Conv1d):
                        m.weight.normal_(0, 0.3)
        before = block_errors(model, gm, xs)
        mt.calibrate(gm, model, xs[0], steps=steps, least_squares=least_squares, network_steps=0, progress=False)
        errors[least_squares] = (before, block_errors(model, gm, xs))
    before, after = errors[True]
    assert all(before[p] > 0.5 and after[p] < 1e-3 for p in before), errors[True]
    before, after = errors[False]
    assert all(1e-2 < after[p] < 0.7 * before[p] for p in before), errors[False]


@pytest.mark.parametrize("conv,kw", [
    (nn.Conv1d, dict(kernel_size=3, padding=1)),
    (nn.Conv1d, dict(kernel_size=3, stride=2, dilation=2, padding=2, groups=2)),
    (nn.Conv2d, dict(kernel_size=(3, 1), padding=(1, 0), groups=4)),
    (nn.Conv2d, dict(kernel_size=3, padding="same", padding_mode="reflect")),
    (nn.Conv2d, dict(kernel_size=1, groups=4, bias=False)),
])
def test_patches_and_solution_layout_match_the_convolution(conv, kw):
    """im2col (:func:`_patches`) times the solution layout (:func:`_set_solution`) is the convolution itself."""
    torch.manual_seed(0)
    layer = conv(8, 12, **kw)
    x = torch.randn(3, 8, *([7] * (2 if conv is nn.Conv2d else 1)))
    a = calibration._patches(layer, x)  # (rows, G, features)
    w = layer.weight.reshape(layer.groups, 12 // layer.groups, -1).transpose(1, 2)  # (G, features, out/G)
    y = torch.einsum("rgf,gfo->rgo", a, w)
    if layer.bias is not None:
        y = y + layer.bias.reshape(layer.groups, -1)
    torch.testing.assert_close(y, calibration._outputs(layer, layer(x)), rtol=1e-5, atol=1e-5)
    other = conv(8, 12, **kw)
    full = torch.cat([w, layer.bias.reshape(layer.groups, 1, -1)], 1) if layer.bias is not None else w
    with torch.no_grad():
        calibration._set_solution(other, full)
    torch.testing.assert_close(other(x), layer(x))


# ----------------------------------------------------------------------------- what it leaves alone


def test_the_input_model_is_untouched():
    model = trained(Net(1))
    model.stages[0].train()  # mixed flags are kept as they are
    model.stem[0].weight.requires_grad_(False)
    calls = []
    model.stages[0][1].conv1.register_forward_hook(lambda *a: calls.append(1))
    model.register_forward_pre_hook(lambda *a: calls.append(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    gm = transform(model, inputs(model, 2))
    calls.clear()
    mt.calibrate(gm, model, inputs(model, 64)[0], steps=5, network_steps=3, progress=False)
    assert calls == []  # no hook of the user's fired
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert all(p.grad is None for p in model.parameters())


def test_deterministic_under_seed_and_the_global_rng_is_left_alone():
    model = trained(Net(1))
    x = inputs(model, 64)[0]
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        gm = transform(model, (x[:2],))
        rng = torch.get_rng_state()
        mt.calibrate(gm, model, x, steps=8, batch_size=16, seed=seed, network_steps=8, progress=False)
        assert torch.equal(torch.get_rng_state(), rng)
        runs[name] = gm.state_dict()
    assert all(torch.equal(v, runs["b"][k]) for k, v in runs["a"].items())
    assert any(not torch.equal(v, runs["c"][k]) for k, v in runs["a"].items())


def test_training_flags_and_checkpoint_flags_of_the_result_are_restored():
    model = trained(Net(1))
    gm = transform(model, inputs(model, 2))
    gm.train()
    block = gm.get_submodule(gm.meta["mgic"].rewritten[0].module)
    block.checkpoint = True
    mt.calibrate(gm, model, inputs(model, 32)[0], steps=3, network_steps=3, progress=False)
    assert all(m.training for m in gm.modules()) and block.checkpoint is True


# ----------------------------------------------------------------------------- the result


def test_the_result_still_trains_and_its_graph_lints():
    model = trained(Net(1))
    _, gm, xs, _ = calibrated(model)
    gm.graph.lint()
    gm.train()
    gm(*xs).square().mean().backward()
    for d in gm.meta["mgic"].rewritten:
        block = gm.get_submodule(d.module)
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (d.module, name)
        assert any(n.weight.abs().sum() > 0 for n in block.norms)  # the corrections N_j learned to switch on


def test_batchnorm_statistics_are_refitted_without_changing_the_eval_function():
    model = trained(Net(1))
    xs = inputs(model, 96, seed=1)
    gm = transform(model, tuple(t[:2] for t in xs)).eval()
    d = gm.meta["mgic"].rewritten[0]
    block = gm.get_submodule(d.module)
    with torch.no_grad():
        data = calibration._BlockData(model.stem(xs[0]), torch.zeros(0))  # the first block's input
    with torch.no_grad():
        for p in block.parameters():  # weights far from what the inherited statistics describe
            p.add_(0.3 * torch.randn_like(p))

        def train_mode_gap():
            eval_out = block.eval()(data.x)
            norms = calibration._running_norms(block)
            for m in norms:
                m.train()
            saved = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
            train_out = block(data.x)
            for m, (mean, var) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.eval()
            return eval_out, ((train_out - eval_out).norm() / eval_out.norm()).item()

        out_before, gap_before = train_mode_gap()
        calibration.refit_statistics(block, data, batch_size=96)
        out_after, gap_after = train_mode_gap()
    torch.testing.assert_close(out_after, out_before, rtol=1e-4, atol=1e-5)  # eval function unchanged
    assert gap_before > 0.1 and gap_after < 2e-3, (gap_before, gap_after)  # statistics fit the data (up to n/(n-1))


def test_survives_torch_save_and_load_and_records_the_fit_there():
    model = trained(Net(1))
    gm = transform(model, inputs(model, 2))
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "mgic" not in loaded.meta
    mt.calibrate(loaded, model, inputs(model, 32)[0], steps=3, network_steps=3, progress=False)
    assert all(d.fit is not None and d.fit.samples == 32 for d in mt.plan_of(loaded).rewritten)
    assert loaded.meta["mgic"] is loaded._mgic_plan


# ----------------------------------------------------------------------------- the data it takes


def test_dataloader_batches_with_targets_and_max_samples():
    model = trained(Net(1))
    x = inputs(model, 100)[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(100, dtype=torch.long)),
                                         batch_size=24, shuffle=True)
    gm = transform(model, (x[:2],))
    rng = torch.get_rng_state()
    mt.calibrate(gm, model, loader, steps=5, max_samples=50, network_steps=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the loader's shuffle drew from a forked generator
    assert [d.fit.samples for d in gm.meta["mgic"].rewritten] == [50, 50, 50]
    gm2 = transform(model, (x[:2],))
    mt.calibrate(gm2, model, [x[:30], x[30:70]], steps=5, network_steps=0, progress=False)  # a list of plain tensors
    assert [d.fit.samples for d in gm2.meta["mgic"].rewritten] == [70, 70, 70]


def test_a_model_with_two_inputs_takes_the_first_two_items_of_each_batch():
    model = trained(TwoInputs())
    xs = inputs(model, 64, seed=1)
    gm = transform(model, tuple(t[:2] for t in xs))
    gm.meta["uncalibrated"] = copy.deepcopy(gm)
    before = block_errors(model, gm, xs)
    loader = [(xs[0][i:i + 16], xs[1][i:i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    mt.calibrate(gm, model, loader, steps=40, network_steps=20, progress=False)
    after = block_errors(model, gm, xs)
    assert all(after[p] < 0.7 * before[p] for p in before), (before, after)


@pytest.fixture(scope="module")
def shared():
    """A model and its transform for the tests that only check refusals (they never get to change ``gm``)."""
    model = trained(Net(1))
    return model, transform(model, inputs(model, 2))


@pytest.mark.parametrize("data,match", [
    ({"x": 1}, "tensor or an iterable"),
    ("images.npy", "tensor or an iterable"),
    ([], "no sample"),
    ([{"x": 1}], "batch 0 is a dict"),
    ([(1, 2)], "input tensor"),
    ([torch.randn(4, 3, 12)], "does not match"),
    ([torch.randn(4, 2, 12).double()], "does not match"),
    ([torch.randn(4, 2)], "does not match"),
])
def test_bad_data_says_what_to_do(data, match, shared):
    model, gm = shared
    with pytest.raises(InputError, match=match) as info:
        mt.calibrate(gm, model, data, progress=False)
    assert "Hint" in str(info.value) or "expected" in str(info.value)


def test_bad_arguments_are_input_errors(shared):
    model, gm = shared
    x = inputs(model, 8)[0]
    with pytest.raises(InputError, match="GraphModule that mgicify returned"):
        mt.calibrate(model, model, x)
    with pytest.raises(InputError, match="nn.Module mgicify transformed"):
        mt.calibrate(gm, "model", x)
    for bad in (dict(steps=-1), dict(lr=0.0), dict(batch_size=0), dict(max_samples=True), dict(seed=1.5),
                dict(network_steps=-2), dict(network_lr=float("nan"))):
        with pytest.raises(InputError):
            mt.calibrate(gm, model, x, **bad)


def test_a_different_original_is_refused_with_a_clear_error(shared):
    model, gm = shared
    with pytest.raises(MGICError, match="has no node"):
        mt.calibrate(gm, nn.Sequential(nn.Conv1d(2, 16, 3), nn.ReLU()), inputs(model, 8)[0], progress=False)


def test_progress_lines_and_silence(capsys):
    model = trained(Net(1))
    lines = []
    gm = transform(model, inputs(model, 2))
    mt.calibrate(gm, model, inputs(model, 16)[0], steps=2, network_steps=2, progress=lines.append)
    assert len(lines) == 4 and lines[0].startswith("calibrate stages.0.0 [1/3]: error ") and " -> " in lines[0]
    assert lines[3].startswith("calibrate network output error ") and "(2 Adam steps, 16 samples" in lines[3]
    x = inputs(model, 16)[0]
    mt.calibrate(transform(model, inputs(model, 2)), model, x, steps=2, network_steps=0, progress=False)
    assert capsys.readouterr().err == ""
    mt.calibrate(transform(model, inputs(model, 2)), model, x, steps=2, network_steps=0, progress=True)
    assert capsys.readouterr().err.count("calibrate ") == 3


def test_a_plan_without_rewritten_blocks_is_returned_unchanged():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU()).eval()
    gm = transform(model, (torch.randn(2, 2, 12),))
    assert not gm.meta["mgic"].rewritten
    assert mt.calibrate(gm, model, torch.randn(8, 2, 12), progress=False) is gm


def test_exported_from_the_package():
    assert mt.calibrate is calibration.calibrate and "calibrate" in mt.__all__
    assert dataclasses.is_dataclass(BlockFit)


def test_mgicify_init_calibrate_runs_the_pass(monkeypatch):
    monkeypatch.setattr(mt.api, "calibrate", functools.partial(calibration.calibrate, network_steps=5))
    model = trained(Net(1))
    x = inputs(model, 48)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = mt.mgicify(model, x[:2], group_size=4, coarsest_width=4, rule="compact", init="calibrate", calibration=x,
                        calibration_steps=10)
    fits = [d.fit for d in mt.plan_of(gm).rewritten]
    assert len(fits) == 3 and all(f.samples == 48 and f.steps == 10 and f.error_after < f.error_before for f in fits)


class Mixer(nn.Module):
    """Channels-last residual MLP blocks (Linear / LayerNorm): the closed form's linear path."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(6, c)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
                                     for _ in range(2)])
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(1))


class Strided(nn.Module):
    """A width- and stride-changing residual block between two plain ones (``transitions=True``: a connector)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 16, 3, padding=1)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.short = nn.Conv2d(16, 32, 1, stride=2)
        self.after = Block(32, 2)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.down(x) + self.short(x))
        return self.head(self.after(x).mean((2, 3)))


@pytest.mark.parametrize("kind,steps,factor", [("linear", 30, 0.8), ("transition", 80, 0.9)])
def test_linear_blocks_and_transition_blocks_are_fitted(kind, steps, factor):
    """Linear layers go through the closed form's linear path; a transition block (fresh connector and levels,
    no closed form) is fitted by Adam alone, more slowly."""
    torch.manual_seed(0)
    model = (Mixer() if kind == "linear" else Strided()).eval()
    x = torch.randn(96, 5, 6) if kind == "linear" else torch.randn(96, 2, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = mt.mgicify(model, x[:2], group_size=4, coarsest_width=8, rule="compact", init="inherit",
                        transitions=kind == "transition")
    plan = mt.plan_of(gm)
    if kind == "transition":
        assert any(d.kind == "transition" for d in plan.rewritten)
    mt.calibrate(gm, model, x, steps=steps, network_steps=10, progress=False)
    fits = [d.fit for d in mt.plan_of(gm).rewritten]
    assert len(fits) >= 2 and all(f.error_after < factor * f.error_before for f in fits), fits
    gm.graph.lint()


def test_block_errors_measure_each_block_on_its_own_without_changing_anything():
    """The budget search's sensitivity: per block, on the original's own activations, nothing modified; errors fall
    as the finest level's groups grow (each grouped level holds the smaller groups' solutions) and do not depend on
    the other blocks' weights."""
    model = trained(Net(1, c=32))
    x = inputs(model, 96)[0]
    errors = []
    for group_size, coarsest in ((4, 8), (8, 8), (16, 16)):
        gm = transform_sizes(model, x[:2], group_size, coarsest).train()
        state = {k: v.clone() for k, v in gm.state_dict().items()}
        errors.append(calibration.block_errors(gm, model, x))
        paths = {d.path for d in mt.plan_of(gm).rewritten}
        assert set(errors[-1]) == paths == {"stages.0.0", "stages.0.1", "stages.1.0"}
        assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items()) and gm.training
        assert all(d.fit is None for d in mt.plan_of(gm).rewritten)
    for path in errors[0]:
        assert errors[0][path] > errors[1][path] > errors[2][path] > 0, [e[path] for e in errors]
    with torch.no_grad():
        for p in gm.get_submodule(mt.plan_of(gm).rewritten[0].module).parameters():
            p.normal_()
    scrambled = calibration.block_errors(gm, model, x)
    assert scrambled["stages.0.0"] != errors[2]["stages.0.0"]
    assert scrambled["stages.0.1"] == errors[2]["stages.0.1"] and scrambled["stages.1.0"] == errors[2]["stages.1.0"]
    as_is = calibration.block_errors(gm, model, x, least_squares=False)
    assert as_is["stages.0.1"] > errors[2]["stages.0.1"]


def transform_sizes(model, example, group_size, coarsest):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mt.mgicify(model, example, group_size=group_size, coarsest_width=coarsest, rule="compact",
                          init="inherit")
