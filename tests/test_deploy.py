"""The deployment API: ``optimize_for_inference`` and ``export_pt2`` / ``load_pt2`` compute what eager eval computes.

The compiled paths (inductor, AOTInductor's C++ build) take tens of seconds even for the tiny
network used here, so they are marked ``slow``; the argument checks run in the fast suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import mgic_transform as mt
from mgic_transform.deploy import InferenceModule, export_pt2, load_pt2, optimize_for_inference
from mgic_transform.errors import ConfigError, InputError


class Tiny(nn.Module):
    """stem -> two residual conv-BN blocks -> pooled linear head: small enough to compile in seconds."""

    def __init__(self, c: int = 32, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                                  nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) for _ in range(blocks))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def _trained_mgic(blocks: int = 2) -> nn.Module:
    """The MGIC network of :class:`Tiny` with every correction switched on and non-trivial BN statistics, in eval."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gm = mt.mgicify(Tiny(blocks=blocks), x, group_size=4, coarsest_width=8)
    assert gm.meta["mgic"].rewritten
    with torch.no_grad():
        for block in (m for m in gm.modules() if isinstance(m, mt.MGICBlock)):
            for n in block.norms:
                n.weight.uniform_(0.5, 1.5)
    gm.train()
    for _ in range(2):
        gm(x)
    return gm.eval()


def _state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _unchanged(model: nn.Module, before) -> bool:
    state, modes = before
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and modes == [m.training for m in model.modules()]


@pytest.mark.parametrize("channels_last", [None, False, True])
def test_optimize_for_inference_equals_eager_eval_and_leaves_the_model_alone(channels_last):
    gm = _trained_mgic().train()  # a model left in train mode: the copy is eval, the model stays as it was
    before = _state(gm)
    fast = optimize_for_inference(gm, torch.randn(2, 3, 8, 8), channels_last=channels_last)
    assert isinstance(fast, InferenceModule) and not fast.compiled
    if channels_last is not None:
        assert fast.channels_last is channels_last
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # every BatchNorm folded, N_j included
    x = torch.randn(3, 3, 8, 8)  # another batch size than the example
    with torch.no_grad():
        want = gm.eval()(x)
    gm.train()
    got = fast(x)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert _unchanged(gm, before)


def test_optimize_for_inference_is_exported_and_checks_its_arguments():
    assert mt.optimize_for_inference is optimize_for_inference and mt.export_pt2 is export_pt2 and mt.load_pt2 is load_pt2
    gm = _trained_mgic()
    with pytest.raises(InputError, match="tuple of tensors"):
        optimize_for_inference(gm, [[1.0]])
    with pytest.raises(InputError, match="nn.Module"):
        optimize_for_inference(lambda x: x, torch.randn(1, 3, 8, 8))


def test_export_pt2_and_load_pt2_say_what_to_do(tmp_path):
    gm = _trained_mgic()
    with pytest.raises(ConfigError, match=r"\.pt2"):
        export_pt2(gm, torch.randn(1, 3, 8, 8), tmp_path / "model.pt")
    with pytest.raises(InputError, match="dynamic_batch=False"):
        export_pt2(nn.Bilinear(4, 5, 3), (torch.randn(2, 4), torch.randn(3, 5)), tmp_path / "m.pt2", fold=False)
    with pytest.raises(InputError, match="export_pt2"):
        load_pt2(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a package")
    with pytest.raises(InputError, match="export it again"):
        load_pt2(tmp_path / "junk.pt2")


def test_export_failure_names_the_cause():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # Python branch on a value: torch.export cannot capture it

    with pytest.raises(InputError, match="torch.export could not capture"):
        export_pt2(DataDependent(), torch.randn(2, 3), "unused.pt2", fold=False)


@pytest.mark.slow  # inductor compiles C++ kernels: ~20-40 s on two shared cores
def test_optimize_for_inference_compiled_equals_eager():
    torch._dynamo.reset()
    gm = _trained_mgic(blocks=1)  # one MGIC block (3 levels): fewer kernels to build
    before = _state(gm)
    fast = optimize_for_inference(gm, torch.randn(2, 3, 8, 8), compile=True)
    assert fast.compiled and fast.compile_seconds > 0 and not fast.channels_last
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), gm(x), rtol=1e-4, atol=1e-5)
    assert _unchanged(gm, before)


_LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    package = torch._inductor.aoti_load_package(sys.argv[1])   # plain torch: no mgic_transform in this process
    assert "mgic_transform" not in sys.modules
    inputs = torch.load(sys.argv[2])
    torch.save([package(x) for x in inputs], sys.argv[3])
""")


@pytest.mark.slow  # torch.export + AOTInductor's C++ build: ~40-60 s on two shared cores
def test_export_pt2_runs_in_a_fresh_process_at_any_batch(tmp_path):
    gm = _trained_mgic(blocks=1)
    before = _state(gm)
    path = export_pt2(gm, torch.randn(1, 3, 8, 8), tmp_path / "out" / "tiny_mgic.pt2")  # batch 1: still dynamic
    assert path == tmp_path / "out" / "tiny_mgic.pt2" and path.stat().st_size > 0
    assert _unchanged(gm, before)
    inputs = [torch.randn(b, 3, 8, 8) for b in (1, 5)]
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        for x, got in zip(inputs, outputs):
            torch.testing.assert_close(got, gm(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_pt2(path)(inputs[1]), outputs[1])  # and in this process, through load_pt2
