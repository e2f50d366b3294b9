"""The speed benchmarks run (``--quick``) and print what they claim to measure.

They are measurement scripts, not tests of speed: these checks only keep them from rotting
(a signature change in ``MGICBlock.forward`` broke the profile's ablation once). Each runs
in a subprocess from the repository root, ~5-20 s; marked ``slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(args: list[str], timeout: int = 300) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc.stdout


def rows(out: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_speed_quick_measures_every_column_of_a_setting():
    out = run(["benchmarks/speed.py", "--quick", "--models", "mobilenet_v3_large"])
    assert "## mobilenet_v3_large, rule " in out and ", 1 thread, nchw" in out
    assert "no GPU figure exists yet" in out
    lines = {r[0]: r for r in rows(out, "") if len(r) == 9}
    for what in ("inference latency, batch 1", "peak memory, inference batch 1", "training step, batch 2",
                 "peak memory, training step batch 2", "inference latency, batch 1, BN-folded"):
        assert what in lines, sorted(lines)
        cells = lines[what][1:5]  # original, MGIC, MGIC ckpt, pruned peer
        training = what.startswith(("training", "peak memory, training"))
        assert (cells[2] != "-") == training  # the checkpointed network differs only while autograd records
        orig, mgic, peer = (float(re.match(r"[\d.]+", c).group()) for c in (cells[0], cells[1], cells[3]))
        assert orig > 0 and mgic > 0 and peer > 0
        assert float(lines[what][5]) == pytest.approx(mgic / orig, abs=0.01)
        assert float(lines[what][7]) == pytest.approx(mgic / peer, abs=0.01)
    # the peer is pruned to at most the MGIC network's FLOPs
    (model_row,) = [r for r in rows(out, "mobilenet_v3_large") if len(r) == 8]
    mgic_x, peer_x = (float(v) for v in re.findall(r"\(x([\d.]+)\)", model_row[5]))
    assert peer_x <= mgic_x + 0.02


def test_profile_ablation_checks_every_variant_against_the_package():
    out = run(["benchmarks/profile_mgic_block.py", "--quick", "--ablation"])
    variants = [r[0] for r in rows(out, "") if len(r) == 4 and r[0] not in ("network", "---")]
    assert any(v.startswith("MGIC baseline") for v in variants) and "MGIC + mt.fold_batchnorm" in variants
    assert len(rows(out, "layer")) == 12  # every MGIC block of ResNet-50, timed against its bottleneck


def test_grouped_pointwise_quick():
    out = run(["benchmarks/grouped_pointwise.py", "--quick", "--threads", "1"])
    table = rows(out, "256 -> 128") + rows(out, "128 -> 256")
    assert len(table) == 2 and all(len(r) == 11 and all(float(c) > 0 for c in r[1:]) for r in table)


def test_compress_trained_quick_runs_every_arm():
    out = run(["benchmarks/compress_trained.py", "--quick"], timeout=600)
    for task in ("mnist1d", "digits"):
        assert f"### {task}" in out
    arms = rows(out, "A:") + rows(out, "B:") + rows(out, "C:") + rows(out, "D:")
    assert len(arms) == 8, arms  # four arms on two tasks, one budget
    for r in arms:
        mean = float(r[1].split("±")[0])
        assert 0.0 <= mean <= 100.0
    assert out.count("-> arms B and C use") == 2


def test_profile_network_quick_compares_the_two_networks_op_by_op():
    out = run(["benchmarks/profile_network.py", "--quick", "--threads", "1"])
    kinds = {r[0]: r for r in rows(out, "") if len(r) == 5 and r[0] in ("convolution", "batch norm")}
    assert set(kinds) == {"convolution", "batch norm"} and all(float(c) > 0 for r in kinds.values() for c in r[1:])
    (total_inf, total_train) = [r for r in rows(out, "**all ops**")]
    assert int(total_inf[4]) > int(total_inf[1]) > 0  # the MGIC network runs more ops than the original


def test_small_net_step_quick_times_the_three_networks_and_counts_their_ops():
    out = run(["benchmarks/small_net_step.py", "--quick"])
    table = rows(out, "mnist1d")
    assert [r[1].split(" ")[0] for r in table] == ["original", "thin", "MGIC"]
    params = [int(r[2].replace(",", "")) for r in table]
    assert params[1] <= params[2] < params[0]  # thin matched to MGIC's count from below
    ops = [int(r[5].replace(",", "")) for r in table]
    assert ops[0] == ops[1] < ops[2]  # same op count for the thin network, more for MGIC
    assert all(float(r[3]) > 0 for r in table)


def test_accuracy_per_parameter_quick_runs_every_arm_and_resumes_from_its_cache(tmp_path):
    args = ["benchmarks/accuracy_per_parameter.py", "--quick", "--workers", "1", "--out", str(tmp_path), "--write"]
    out = run(args, timeout=900)
    md = (tmp_path / "accuracy_per_parameter.md").read_text()
    assert (tmp_path / "accuracy_per_parameter.png").stat().st_size > 10_000
    for task in ("mnist1d", "digits"):
        section = md.split(f"## {task}")[1].split("\n## ")[0]
        table = {r[0]: r for r in rows(section, "") if len(r) == 9 and r[0] not in ("arm", "---:", "---")}
        assert {"thin (width multiplier)", "pruned at init, trained", "pruned after training, fine-tuned"} <= set(table)
        assert any(k.startswith("MGIC ") for k in table), sorted(table)
        params = {arm: float(r[2].rstrip("k")) for arm, r in table.items() if r[2].endswith("k")}
        mgic = [v for k, v in params.items() if k.startswith("MGIC paper")]  # the pruning targets
        # the pruning ratio is bisected to the MGIC point's parameter count
        assert params["pruned at init, trained"] == pytest.approx(mgic[0], rel=0.03)
        assert all(0 <= float(r[5].strip("*").split(" ± ")[0]) <= 100 for r in table.values())
    cached = __import__("json").loads((tmp_path / "accuracy_per_parameter.json").read_text())
    trained = [r for r in rows(md, "") if len(r) == 9 and r[0] not in ("arm", "---")]
    assert len(cached) == len(trained) and all(r[6] == "1" for r in trained)  # one seed, one cached run per row
    assert re.search(r"\[\d+/\d+ ", out)  # progress is printed per finished run
    again = run(args, timeout=900)  # every point is cached: nothing is trained again
    assert re.search(r"(\d+) runs planned, 0 not cached yet", again), again[:500]
