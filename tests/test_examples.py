"""The example scripts and the shared reference models in ``examples/models.py``.

The scripts run in a subprocess with ``--quick`` (tiny data, one epoch) and the tests read
their printed tables; they are marked ``slow`` (tens of seconds each, one runs two
processes under ``torch.distributed.run``). The model checks are fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
from models import FunctionApproxNet, cifar_resnet  # noqa: E402


def run(args: list[str], timeout: int = 300) -> str:
    """Run ``python ARGS`` from the repository root; fail with the output if it exits non-zero."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def table_rows(out: str) -> list[list[str]]:
    """Cells of the body rows of the first Markdown table in ``out``."""
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[1:]]


def count(cell: str) -> float:
    """``"0.269M (1.00x)"`` / ``"48.6k"`` -> a number."""
    m = re.match(r"([\d.]+)([kM])", cell)
    assert m, cell
    return float(m.group(1)) * {"k": 1e3, "M": 1e6}[m.group(2)]


# ----------------------------------------------------------------------------- models (fast)
@pytest.mark.parametrize("depth, params", [(20, 0.27e6), (56, 0.85e6)])
def test_cifar_resnet_matches_he_et_al(depth, params):
    """Option-A CIFAR ResNets have He et al.'s (and the paper's Table 3) parameter counts."""
    model = cifar_resnet(depth)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    torch.fx.symbolic_trace(model)  # mgicify must be able to trace it


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_shortcuts_and_grey_input(shortcut):
    model = cifar_resnet(20, in_channels=1, shortcut=shortcut).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_function_approx_net_follows_table2():
    """Two blocks per width 32..c_max, residual only when the width is unchanged, 1x1 in and out."""
    net = FunctionApproxNet(c_max=128)
    widths = [(b.expand.in_channels, b.project.out_channels, b.use_residual) for b in net.blocks]
    assert widths == [(16, 32, False), (32, 32, True), (32, 64, False), (64, 64, True),
                      (64, 128, False), (128, 128, True)]
    assert all(b.expand.out_channels == 4 * b.expand.in_channels for b in net.blocks)
    assert net.head[0].in_channels == 128 and net.head[0].out_channels == 64
    assert net(torch.randn(3, 5, 1, 1)).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        FunctionApproxNet(c_max=48)


def test_function_approx_net_thin_scales_every_width():
    """The thin baseline: same depth and residual pattern, every width times width_mult."""
    full, thin = FunctionApproxNet(c_max=64), FunctionApproxNet(c_max=64, width_mult=0.5)
    assert [(b.expand.in_channels, b.project.out_channels, b.use_residual) for b in thin.blocks] == \
        [(8, 16, False), (16, 16, True), (16, 32, False), (32, 32, True)]
    assert thin.head[0].out_channels == 32 and thin.out.in_channels == 32
    assert len(thin.blocks) == len(full.blocks)
    assert sum(p.numel() for p in thin.parameters()) < sum(p.numel() for p in full.parameters()) / 3
    assert thin(torch.randn(3, 5, 1, 1)).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        FunctionApproxNet(c_max=64, width_mult=0)


# ----------------------------------------------------------------------------- scripts (slow)
@pytest.mark.parametrize("script", ["train_digits.py", "function_approximation.py"])
def test_help(script):
    out = run([str(EXAMPLES / script), "--help"], timeout=120)
    assert "--quick" in out and "--write" in out


@pytest.mark.slow
def test_train_digits_quick(tmp_path):
    results = tmp_path / "digits.md"
    out = run([str(EXAMPLES / "train_digits.py"), "--quick", "--threads", "1",
               "--write", "--results-file", str(results)])
    assert "epoch  1/1" in out  # progress lines
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["ResNet-20", "MGIC-ResNet-20 (s_g=8, s_c=16)"]
    (p0, f0), (p1, f1) = [(count(r[1]), count(r[2])) for r in rows]
    assert p1 < p0 and f1 < f0  # the rewrite is smaller on both counts
    for r in rows:
        acc = float(re.match(r"([\d.]+)% ± ([\d.]+)", r[3]).group(1))
        assert 0.0 <= acc <= 100.0
    assert "| MGIC-ResNet-20" in results.read_text()


@pytest.mark.slow
def test_train_digits_torchrun_two_processes():
    """DistributedDataParallel on CPU (gloo): trains, and only rank 0 prints the table."""
    out = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "train_digits.py"), "--quick"], timeout=400)
    assert "2 process(es)" in out
    assert out.count("| ResNet-20 |") == 1 and out.count("| MGIC-ResNet-20") == 1
    assert out.count("test accuracy") == 2  # one per model, rank 0 only


@pytest.mark.slow
def test_function_approximation_quick(tmp_path):
    args = [str(EXAMPLES / "function_approximation.py"), "--quick", "--threads", "1"]
    try:
        import matplotlib  # noqa: F401  (the plot is optional: matplotlib is an "examples" extra)

        args += ["--write", "--results-dir", str(tmp_path)]
    except ImportError:
        matplotlib = None
    out = run(args)
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["MobileNetV3-32", "Thin-32", "MGIC-32", "MGIC-compact-32",
                                    "MobileNetV3-64", "Thin-64", "MGIC-64", "MGIC-compact-64"]
    params = {r[0]: count(r[3]) for r in rows}
    for c in (32, 64):
        orig, thin, paper, compact = (params[f"{k}-{c}"] for k in ("MobileNetV3", "Thin", "MGIC", "MGIC-compact"))
        assert paper < orig and compact < orig  # both rules shrink the network
        assert thin <= paper  # the thin baseline is matched to the paper rule's budget from below ...
        assert thin > 0.9 * paper  # ... and close to it
    assert all(float(r[5]) >= 0 for r in rows)
    assert "Paper (Sec. 4.2, Fig. 4)" in out and "Verdict: this run" in out
    if matplotlib is not None:
        assert (tmp_path / "function_approximation.png").stat().st_size > 1000
        assert "| MGIC-64 |" in (tmp_path / "function_approximation.md").read_text()
