"""Where does an MGICBlock spend its CPU time? (issue 5.4) ResNet-50, s_g=32, s_c=64.

Three views, all in eval mode under ``torch.inference_mode()`` on one batch
(default 8x3x224x224), every MGICBlock run on the exact input it sees inside the
transformed network:

1. **per block**: median time of each MGICBlock vs the original bottleneck it
   replaced (same input), interleaved;
2. **per part**: the blocks run through an instrumented copy of
   ``MGICBlock.forward`` (same math, with ``record_function`` labels) and the
   profiler's time is summed per part: restriction R, fine grouped levels,
   coarsest level, coarse-grid residual ``y - R x``, prolongation P, norm N,
   correction add;
3. **per op**: ``torch.profiler`` key_averages over all MGICBlocks, by self CPU time.

With ``--prototype`` it also times :class:`FastMGICBlock` (``fast_mgic_block.py``
beside this file), a benchmark-only re-implementation with the same math, on
every block and on the whole network.

Usage::

    python benchmarks/profile_mgic_block.py              # batch 8, NCHW
    python benchmarks/profile_mgic_block.py --channels-last --prototype
    python benchmarks/profile_mgic_block.py --quick
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import code_version, load_line, machine_line, median  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def instrumented_forward(block: mt.MGICBlock, x: torch.Tensor) -> torch.Tensor:
    """``MGICBlock.forward`` with a profiler label around every part (same math, same order)."""
    if block.connector is not None:
        with record_function("part: connector"):
            x = block.connector(x)
    xs = [x]
    for restrict in block.restrict:
        with record_function("part: restrict R"):
            xs.append(restrict(xs[-1]))
    with record_function("part: coarsest level (ungrouped)"):
        y = block.levels[-1](xs[-1])
    for j in range(len(block.restrict) - 1, -1, -1):
        restricted = xs.pop()
        with record_function("part: residual y - Rx"):
            r = y - restricted
        with record_function("part: prolong P"):
            r = block.prolong[j](r)
        with record_function("part: norm N"):
            r = block.norms[j](r)
        with record_function("part: correction add"):
            y = xs[-1] + r
        with record_function("part: fine level (grouped)"):
            y = block.levels[j](y)
    return y


def block_inputs(gm: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input every MGICBlock of ``gm`` receives when ``gm(x)`` runs."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].clone()))
             for name, m in gm.named_modules() if isinstance(m, mt.MGICBlock)]
    with torch.inference_mode():
        gm(x)
    for h in hooks:
        h.remove()
    return seen


def timeit(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            f = fns[k]
            with torch.inference_mode():
                f()
            times[k].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def part_table(blocks: dict[str, mt.MGICBlock], inputs: dict[str, torch.Tensor], reps: int) -> list[str]:
    with torch.inference_mode():
        for name, b in blocks.items():
            instrumented_forward(b, inputs[name])  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                for name, b in blocks.items():
                    instrumented_forward(b, inputs[name])
    parts: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("part: "):
            parts[e.key[6:]] += e.cpu_time_total / reps / 1e3  # ms per network pass
    total = sum(parts.values())
    return [f"| {k} | {v:.1f} | {100 * v / total:.1f}% |" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])] + \
           [f"| **all MGIC blocks** | {total:.1f} | 100% |"]


def op_table(blocks: dict[str, mt.MGICBlock], inputs: dict[str, torch.Tensor], reps: int, top: int) -> list[str]:
    with torch.inference_mode():
        for name, b in blocks.items():
            b(inputs[name])
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(reps):
                for name, b in blocks.items():
                    b(inputs[name])
    evs = [e for e in prof.key_averages() if not e.key.startswith("part: ")]
    total = sum(e.self_cpu_time_total for e in evs)
    rows = []
    for e in sorted(evs, key=lambda e: -e.self_cpu_time_total)[:top]:
        rows.append(f"| {e.key} | {e.count // reps} | {e.self_cpu_time_total / reps / 1e3:.1f} | "
                    f"{100 * e.self_cpu_time_total / total:.1f}% |")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see README)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per block (default 7, --quick 2)")
    p.add_argument("--prototype", action="store_true", help="also time FastMGICBlock (benchmarks/fast_mgic_block.py)")
    p.add_argument("--quick", action="store_true", help="batch 2, 2 rounds")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/profile_mgic_block[_channels_last].md")
    args = p.parse_args(argv)
    if args.quick:
        args.batch = min(args.batch, 2)
    rounds = args.rounds or (2 if args.quick else 7)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.set_num_threads(args.threads)
    started = load_line()
    print(f"# {machine_line()}; {started}", file=sys.stderr)

    torch.manual_seed(0)
    orig = torchvision.models.resnet50(weights=None).eval()
    gm = mt.mgicify(orig, torch.zeros(1, 3, 224, 224), group_size=32, coarsest_width=64).eval()
    orig.to(memory_format=fmt)
    gm.to(memory_format=fmt)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=fmt)
    inputs = block_inputs(gm, x)
    blocks = {n: m for n, m in gm.named_modules() if isinstance(m, mt.MGICBlock)}

    fast = {}
    if args.prototype:
        from fast_mgic_block import FastMGICBlock, fold_bn_in_graph
        from torch.fx.experimental.optimization import fuse as fx_fuse

        fast = {n: FastMGICBlock.from_block(b).eval() for n, b in blocks.items()}
        orig_fused = {n: fx_fuse(orig.get_submodule(n)) for n in blocks}  # BN folded, for a fair comparison
        with torch.inference_mode():
            for n, b in blocks.items():
                ref, got = b(inputs[n]), fast[n](inputs[n])
                err = (ref - got).abs().max().item() / ref.abs().max().item()
                assert err < 1e-4, f"FastMGICBlock differs from MGICBlock at {n}: rel. err {err:.2e}"

    rows = []
    totals: dict[str, float] = defaultdict(float)
    for n, b in blocks.items():
        xin = inputs[n]
        fns = {"orig": lambda ob=orig.get_submodule(n), xin=xin: ob(xin), "mgic": lambda b=b, xin=xin: b(xin)}
        if fast:
            fns["fast"] = lambda fb=fast[n], xin=xin: fb(xin)
            fns["orig_fused"] = lambda ob=orig_fused[n], xin=xin: ob(xin)
        t = timeit(fns, rounds)
        for k, v in t.items():
            totals[k] += v
        lv = "/".join(str(lvl) for lvl in gm.meta["mgic"].rewritten[[d.module for d in gm.meta["mgic"].rewritten].index(n)].levels)
        row = f"| {n} | {tuple(xin.shape[1:])} | {lv} | {1e3 * t['orig']:.2f} | {1e3 * t['mgic']:.2f} | {t['mgic'] / t['orig']:.2f} |"
        if fast:
            row += (f" {1e3 * t['fast']:.2f} | {t['fast'] / t['mgic']:.2f} | {1e3 * t['orig_fused']:.2f} | "
                    f"{t['fast'] / t['orig_fused']:.2f} |")
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    tot = f"| **sum** | | | {1e3 * totals['orig']:.1f} | {1e3 * totals['mgic']:.1f} | {totals['mgic'] / totals['orig']:.2f} |"
    if fast:
        tot += (f" {1e3 * totals['fast']:.1f} | {totals['fast'] / totals['mgic']:.2f} | {1e3 * totals['orig_fused']:.1f} | "
                f"{totals['fast'] / totals['orig_fused']:.2f} |")
    rows.append(tot)

    net_rows = []
    if fast:
        import copy

        def with_blocks(**opts) -> nn.Module:
            net = copy.deepcopy(gm)
            for n, b in blocks.items():
                net.set_submodule(n, FastMGICBlock.from_block(b, **opts))
            # the rest of the network (stem, transition blocks, head) gets its BN folded too when fold=True
            return fold_bn_in_graph(net) if opts.get("fold", True) else net

        variants = {
            "original": orig,
            "original, BN folded (torch.fx fuse)": fx_fuse(orig),
            "MGIC (package MGICBlock)": gm,
            "MGIC + BN folding": with_blocks(fold=True, inplace=False, matmul_1x1=False),
            "MGIC + in-place residual/correction": with_blocks(fold=False, inplace=True, matmul_1x1=False),
            "MGIC + grouped 1x1 as matmul": with_blocks(fold=False, inplace=False, matmul_1x1=True),
            "MGIC + all three (FastMGICBlock)": with_blocks(fold=True, inplace=True, matmul_1x1=True),
        }
        with torch.inference_mode():
            ref = gm(x)
            for k, net in variants.items():
                if k.startswith("MGIC"):
                    err = (net(x) - ref).abs().max().item() / ref.abs().max().item()
                    assert err < 1e-4, f"{k}: rel. err {err:.2e}"
        t = timeit({k: (lambda net=net: net(x)) for k, net in variants.items()}, rounds)
        for k, v in t.items():
            net_rows.append(f"| {k} | {1e3 * v:.1f} | {v / t['original']:.2f} | {v / t['MGIC (package MGICBlock)']:.2f} |")

    reps = 1 if args.quick else 3
    parts = part_table(blocks, inputs, reps)
    ops = op_table(blocks, inputs, reps, top=15)

    out = [
        "# MGICBlock CPU profile: ResNet-50, s_g=32, s_c=64",
        "",
        f"- machine: {machine_line()}",
        f"- code: {code_version()}",
        f"- load: {started} at start, {load_line()} at end",
        f"- batch {args.batch}x3x224x224, eval, inference_mode, "
        f"{'channels_last' if args.channels_last else 'NCHW (contiguous)'}; block times are medians of {rounds} "
        "interleaved rounds on the block's real input",
        "",
        "## Per block",
        "",
        "| block | input (C, H, W) | level widths | original ms | MGIC ms | MGIC / orig |"
        + (" fast ms | fast / MGIC | orig BN-folded ms | fast / orig BN-folded |" if fast else ""),
        "|---|---|---|--:|--:|--:|" + ("--:|--:|--:|--:|" if fast else ""),
        *rows,
    ]
    if net_rows:
        out += ["", f"## Whole network, batch {args.batch} (ablation: each change alone, then all; same outputs, "
                "checked to 1e-4 relative)", "",
                "| network | ms | / original | / MGIC |", "|---|--:|--:|--:|", *net_rows]
    out += ["", "## Per part (all 12 MGIC blocks, one network pass; profiler time, so slightly inflated)", "",
            "| part | ms | share |", "|---|--:|--:|", *parts,
            "", "## Per op (all 12 MGIC blocks, one network pass, by self CPU time)", "",
            "| op | calls | self ms | share |", "|---|--:|--:|--:|", *ops]
    md = "\n".join(out) + "\n"
    print(md)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / ("profile_mgic_block_channels_last.md" if args.channels_last else "profile_mgic_block.md")
        path.write_text(md)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
