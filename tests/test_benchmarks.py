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


def ratio_matches(printed: str, num: float, den: float) -> bool:
    """Does a ratio printed to 2 decimals agree with ``num / den`` recomputed from cells printed to 1 decimal?

    Each cell is off by up to 0.05 from the value the script divided, which moves the
    recomputed ratio by up to ``r (0.05 / num + 0.05 / den)`` (relative: large for small
    cells), and the printed ratio is off by up to 0.005: together the whole slack.
    """
    r = num / den
    return abs(float(printed) - r) <= r * (0.05 / num + 0.05 / den) * 1.01 + 0.005 + 1e-9


def test_ratio_matches_allows_rounding_and_nothing_more():
    assert ratio_matches("1.48", 28.4, 19.2)  # 1.4792 printed 1.48
    assert ratio_matches("0.14", 0.7, 5.0)  # cells of 0.65..0.75 / 4.95..5.05: ratio 0.129..0.152
    assert not ratio_matches("0.16", 0.7, 5.0)
    assert not ratio_matches("1.50", 28.4, 19.2)


def test_speed_quick_measures_every_column_of_a_setting():
    out = run(["benchmarks/speed.py", "--quick", "--models", "mobilenet_v3_large", "--compile", "--compile-backend", "eager"])
    assert "## mobilenet_v3_large, rule " in out and ", 1 thread, nchw" in out
    assert "no GPU figure exists yet" in out and "- code: commit " in out
    lines = {r[0]: r for r in rows(out, "") if len(r) == 9}
    compiled = "training step, batch 2, torch.compile (backend eager)"
    for what in ("inference latency, batch 1", "peak memory, inference batch 1", "training step, batch 2",
                 "peak memory, training step batch 2", "inference latency, batch 1, BN-folded", compiled):
        assert what in lines, sorted(lines)
        cells = lines[what][1:5]  # original, MGIC, MGIC ckpt, pruned peer
        training = what.startswith(("training", "peak memory, training")) and what != compiled
        assert (cells[2] != "-") == training  # the checkpointed network differs only while autograd records (not compiled)
        orig, mgic, peer = (float(re.match(r"[\d.]+", c).group()) for c in (cells[0], cells[1], cells[3]))
        assert orig > 0 and mgic > 0 and peer > 0
        assert ratio_matches(lines[what][5], mgic, orig), (what, lines[what])
        assert ratio_matches(lines[what][7], mgic, peer), (what, lines[what])
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
    goals = rows(out, "mnist1d") + rows(out, "digits")
    assert [r[:2] for r in goals if len(r) == 8] == [["mnist1d", "0.5"], ["digits", "0.5"]]
    for task in ("mnist1d", "digits"):
        section = out.split(f"## {task} (")[1].split("\n## ")[0]
        arms = [r for r in rows(section, "") if r[0][:2] in ("A:", "B:", "C:", "D:", "E:")]
        assert [r[0][0] for r in arms] == list("ABCDE"), arms  # every arm, at 0 and 1 epoch, with its lr
        for r in arms:
            assert all(0.0 <= float(c.split("±")[0]) <= 100.0 for c in r[1:3]) and float(r[3].split()[0]) > 0
        errors = re.search(r"block output error ([\d.]+) -> ([\d.]+).*network output error ([\d.]+) -> ([\d.]+)",
                           section)
        assert float(errors[2]) < float(errors[1]) and float(errors[4]) < float(errors[3])  # calibration fitted
    variants = [r for r in rows(out, "") if len(r) == 7 and r[0] in ("mnist1d", "digits")]
    assert len(variants) == 12 and all(float(r[4]) >= 0 and float(r[5]) >= 0 and float(r[6]) > 0 for r in variants)


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


def test_op_count_quick_keeps_every_level_within_its_budget():
    """The op counts are deterministic: MobileNetV3-L's MGIC forward stays under 3x the original's aten ops, and every
    block's machinery under the per-level budget (a regression that adds ops to a level fails here)."""
    out = run(["benchmarks/op_count.py", "--quick"])
    (no_grad,) = [r for r in rows(out, "mobilenet_v3_large") if "no_grad" in r[3] and "folded" not in r[3]]
    orig, mgic = (int(c.replace(",", "")) for c in no_grad[4:6])
    assert 0 < orig < mgic < 3 * orig and float(no_grad[6]) == pytest.approx(mgic / orig, abs=0.006)
    budget = int(re.search(r"budget \((\d+)\)", out).group(1))
    blocks = [r for r in rows(out, "features.") if len(r) == 8]
    assert len(blocks) == 9  # every rewritten block of MobileNetV3-L (8/16)
    for r in blocks:
        levels = [int(v) for v in r[3].split(" / ")]
        assert int(r[2]) == sum(levels) + int(r[4]) + int(r[5])  # block = levels + connector + machinery
        assert float(r[6]) <= budget and r[7] == "ok", r


def test_compile_inference_quick_compiles_both_networks():
    out = run(["benchmarks/compile_inference.py", "--quick"], timeout=900)
    table = rows(out, "toy")
    assert [(r[4], r[5]) for r in table] == [("original", "freezing"), ("MGIC", "freezing")]
    for r in table:
        eager, compiled, compile_s = float(r[6]), float(r[7]), float(r[10])
        assert eager > 0 and compiled > 0 and compile_s > 0
        assert ratio_matches(r[8], compiled, eager)
        assert r[4] != "original" or r[9] == "1.00"  # the original is its own baseline


def test_deploy_quick_builds_loads_and_times_both_pt2_files():
    out = run(["benchmarks/deploy.py", "--quick"], timeout=900)
    table = rows(out, "toy")
    assert [(r[3], r[4]) for r in table] == [("1", "original"), ("1", "MGIC"), ("3", "original"), ("3", "MGIC")]
    for r in table:  # one dynamic-batch .pt2 per network serves batch 1 and 3
        eager, pt2, build_s, mb = float(r[5]), float(r[6]), float(r[9]), float(r[10])
        assert eager > 0 and pt2 > 0 and build_s > 0 and mb > 0
        assert ratio_matches(r[7], pt2, eager)
        assert r[4] != "original" or r[8] == "1.00"
    assert "## Targets" in out and "- code: commit " in out
