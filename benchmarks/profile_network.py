"""Where does the whole network's time go, op by op, at a given thread count?

``torch.profiler`` per-op tables (``key_averages``, self CPU time) for one
inference forward of the original network and of its MGIC version side by side,
and the same for a training step, at ``--threads`` intra-op threads (default 2,
the machine's cores, where the 1-thread speed-up disappeared). Each network runs
``--reps`` times under the profiler after a warm-up, and the per-op self times are
divided by ``--reps``. The profiler itself costs a little per op, and the MGIC
network runs ~3x more ops, so its column is slightly inflated: read shares, and
take latencies from ``speed.py``.

A last table groups the MGIC network's ops by op *and input shape*, heaviest
first: which layer sizes the time goes to.

Usage::

    python benchmarks/profile_network.py --threads 2 --write      # results/profile_network_2threads.md
    python benchmarks/profile_network.py --model mobilenet_v3_large --threads 2
    python benchmarks/profile_network.py --quick
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, load_line, preamble  # noqa: E402
from speed import CASES, FORMATS, inference_fn, train_fn  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def op_times(fn: Callable[[], None], reps: int, by_shape: bool = False) -> dict[str, tuple[int, float]]:
    """op name (and input shapes) -> (calls per run, self CPU ms per run)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        for _ in range(reps):
            fn()
    out = {}
    for e in prof.key_averages(group_by_input_shape=by_shape):
        key = f"{e.key} {e.input_shapes}" if by_shape else e.key
        out[key] = (round(e.count / reps), e.self_cpu_time_total / 1e3 / reps)
    return out


def side_by_side(a: dict[str, tuple[int, float]], b: dict[str, tuple[int, float]], top: int) -> list[str]:
    ta, tb = sum(v for _, v in a.values()), sum(v for _, v in b.values())
    keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0.0))[1], b.get(k, (0, 0.0))[1]))[:top]
    rows = ["| op | calls orig | self ms orig | share orig | calls MGIC | self ms MGIC | share MGIC | MGIC - orig ms |",
            "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for k in keys:
        (ca, va), (cb, vb) = a.get(k, (0, 0.0)), b.get(k, (0, 0.0))
        rows.append(f"| {k} | {ca} | {va:.1f} | {100 * va / ta:.1f}% | {cb} | {vb:.1f} | {100 * vb / tb:.1f}% | "
                    f"{vb - va:+.1f} |")
    rows.append(f"| **all ops** | {sum(c for c, _ in a.values())} | {ta:.1f} | | {sum(c for c, _ in b.values())} | "
                f"{tb:.1f} | | {tb - ta:+.1f} |")
    return rows


def categories(ops: dict[str, tuple[int, float]]) -> dict[str, float]:
    """Self time per kind of work: convolution / matmul kernels against memory-bound element-wise ops."""
    kinds = {"convolution": ("conv",), "matmul (grouped 1x1, linear)": ("bmm", "mm", "addmm", "matmul"),
             "batch norm": ("batch_norm",), "element-wise (relu, add, sub, mul, hardswish, copy)":
             ("relu", "clamp", "add", "sub", "mul", "hardswish", "hardsigmoid", "copy", "threshold")}
    out: dict[str, float] = defaultdict(float)
    for k, (_, v) in ops.items():
        name = k.removeprefix("aten::")
        kind = next((kd for kd, pats in kinds.items() if any(p in name for p in pats)), "other")
        out[kind] += v
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CASES), default="resnet50")
    p.add_argument("--rule", default="paper", help="mgicify's hierarchy rule (paper or compact)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--format", choices=sorted(FORMATS), default="nchw")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="mobilenet_v3_large, batch 2, 1 rep")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/profile_network[_model]_Nthreads.md")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.reps = "mobilenet_v3_large", 2, 1
    torch.set_num_threads(args.threads)
    fmt = FORMATS[args.format]
    started = load_line()
    s_g, s_c = CASES[args.model]
    torch.manual_seed(0)
    orig = torchvision.models.get_model(args.model, weights=None)
    gm = mt.mgicify(orig, torch.zeros(1, 3, 224, 224), group_size=s_g, coarsest_width=s_c, rule=args.rule)
    nets: dict[str, nn.Module] = {"orig": orig.to(memory_format=fmt), "mgic": gm.to(memory_format=fmt)}
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,))

    for m in nets.values():
        m.eval()
    inf = {k: op_times(inference_fn(m, x), args.reps) for k, m in nets.items()}
    shapes = op_times(inference_fn(gm, x), args.reps, by_shape=True)
    for m in nets.values():
        m.train()
    trn = {k: op_times(train_fn(m, x, y), args.reps) for k, m in nets.items()}

    cat_rows = ["| kind of op | inference orig ms | inference MGIC ms | training orig ms | training MGIC ms |",
                "|---|--:|--:|--:|--:|"]
    cats = {k: categories(v) for k, v in (("io", inf["orig"]), ("im", inf["mgic"]), ("to", trn["orig"]), ("tm", trn["mgic"]))}
    for kind in sorted({k for c in cats.values() for k in c}, key=lambda k: -cats["im"].get(k, 0.0)):
        cat_rows.append(f"| {kind} | " + " | ".join(f"{cats[c].get(kind, 0.0):.1f}" for c in ("io", "im", "to", "tm")) + " |")
    shape_rows = ["| op, input shapes | calls | self ms | share |", "|---|--:|--:|--:|"]
    total = sum(v for _, v in shapes.values())
    for k, (c, v) in sorted(shapes.items(), key=lambda kv: -kv[1][1])[:args.top + 10]:
        shape_rows.append(f"| {k} | {c} | {v:.1f} | {100 * v / total:.1f}% |")

    out = [
        *preamble(f"Per-op profile of the whole network: {args.model}, original vs MGIC, {args.threads} thread(s)", started),
        "- a 2-thread op waits at its barrier whenever another job holds a core: on a loaded machine these times "
        "measure the scheduler as much as the kernels",
        f"- {args.model}, s_g={s_g}, s_c={s_c}, rule {args.rule}; batch {args.batch}x3x224x224, {args.format}; self CPU time per run, "
        f"averaged over {args.reps} profiled runs after one warm-up",
        "",
        "## By kind of op", "", *cat_rows,
        "", f"## Inference (eval, inference_mode), top {args.top} ops", "", *side_by_side(inf["orig"], inf["mgic"], args.top),
        "", f"## Training step (forward + backward + SGD step), top {args.top} ops", "",
        *side_by_side(trn["orig"], trn["mgic"], args.top),
        "", "## MGIC inference by op and input shape", "", *shape_rows,
    ]
    md = "\n".join(out) + "\n"
    suffix = ("" if args.model == "resnet50" else f"_{args.model}") + f"_{args.threads}threads"
    emit(md, RESULTS / f"profile_network{suffix}.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
