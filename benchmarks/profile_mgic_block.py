"""Where does an MGICBlock spend its CPU time? ResNet-50, s_g=32, s_c=64.

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

With ``--ablation`` it also times, per block and for the whole network, the
package's speed changes against the network as it was first built (commit
ae76e27: grouped 1x1 convolutions as ``nn.Conv2d``, out-of-place residual and
correction in :class:`BaselineMGICBlock`, ``+=`` traced as ``+``): each change
alone, all three, and ``mgic_transform.fold_batchnorm`` on top, beside the original network folded
the same way (the fair baseline for folding).

Usage::

    python benchmarks/profile_mgic_block.py              # batch 8, NCHW
    python benchmarks/profile_mgic_block.py --channels-last --ablation
    python benchmarks/profile_mgic_block.py --quick
"""

from __future__ import annotations

import argparse
import copy
import operator
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved, load_line, machine_line, median, preamble  # noqa: E402

import mgic_transform as mt  # noqa: E402
from mgic_transform.nn.mgic_block import _corrected, _residual, reference_forward  # noqa: E402
from mgic_transform.nn.transfer import plain_convs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "MGIC baseline (as of ae76e27: nn.Conv2d for grouped 1x1, out of place, `+=` traced as `+`)"


def instrumented_forward(block: mt.MGICBlock, x: torch.Tensor) -> torch.Tensor:
    """``MGICBlock.forward`` with a profiler label around every part (same math, same order, same in-place helpers)."""
    if block.connector is not None:
        with record_function("part: connector"):
            x = block.connector(x)
    xs = [x]
    for restrict in block.restrict:
        with record_function("part: restrict R"):
            xs.append(restrict(xs[-1]))
    with record_function("part: coarsest level (ungrouped)"):  # (a block called alone never overwrites x)
        y = block.levels[-1](xs[-1].clone() if block.coarsest_mutates_input else xs[-1])
    for j in range(len(block.restrict) - 1, -1, -1):
        restricted = xs.pop()
        with record_function("part: residual y - Rx"):
            r = _residual(y, restricted)
        del y, restricted
        with record_function("part: prolong P"):
            r = block.prolong[j](r)
        with record_function("part: norm N"):
            r = block.norms[j](r)
        with record_function("part: correction add"):
            y = _corrected(xs[-1], r, may_overwrite_x=False)
        del r
        with record_function("part: fine level (grouped)"):
            y = block.levels[j](y)
    return y


class BaselineMGICBlock(mt.MGICBlock):
    """The block as first written (commit ae76e27), for the ablation: out-of-place residual and correction,
    and (``matmul_1x1=False``) grouped 1x1 convolutions as ``nn.Conv2d``."""

    def __init__(self, block: mt.MGICBlock, *, inplace: bool, matmul_1x1: bool) -> None:
        super().__init__(list(block.levels), list(block.restrict), list(block.prolong), list(block.norms), block.connector,
                         coarsest_mutates_input=block.coarsest_mutates_input)
        self.inplace = inplace
        if not matmul_1x1:
            plain_convs(self)

    def forward(self, x: torch.Tensor, *, overwrite_input: bool = False) -> torch.Tensor:
        if self.inplace:
            return super().forward(x, overwrite_input=overwrite_input)
        return reference_forward(self, x)  # Algorithm 1 out of place, as first written


def out_of_place_adds(net: nn.Module) -> nn.Module:
    """Trace ``+=`` back to ``+`` (what plain torch.fx records) in every GraphModule of ``net``, in place."""
    ops = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
           operator.itruediv: operator.truediv}
    for m in net.modules():
        if isinstance(m, torch.fx.GraphModule):
            for node in m.graph.nodes:
                if node.op == "call_function" and node.target in ops:
                    node.target = ops[node.target]
            m.recompile()
    return net


def with_blocks(gm: nn.Module, *, inplace: bool, matmul_1x1: bool, iadd: bool) -> nn.Module:
    """A copy of ``gm`` with each speed change of the package switched on or off."""
    net = copy.deepcopy(gm)
    for n, b in list(net.named_modules()):
        if isinstance(b, mt.MGICBlock):
            net.set_submodule(n, BaselineMGICBlock(b, inplace=inplace, matmul_1x1=matmul_1x1))
    return net if iadd else out_of_place_adds(net)


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
    """Median seconds of every function, each call under ``torch.inference_mode()`` (see ``_common.interleaved``)."""
    def in_inference_mode(f: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                f()
        return run
    times = interleaved({k: in_inference_mode(f) for k, f in fns.items()}, rounds, warmup)
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
    p.add_argument("--ablation", action="store_true",
                   help="also time the block as first written, each speed change alone, and mt.fold_batchnorm")
    p.add_argument("--quick", action="store_true", help="batch 2, 64 px, 1 round (a smoke test of the script)")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/profile_mgic_block[_channels_last].md")
    args = p.parse_args(argv)
    if args.quick:
        args.batch = min(args.batch, 2)
    rounds = args.rounds or (1 if args.quick else 7)
    size = 64 if args.quick else 224
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.set_num_threads(args.threads)
    started = load_line()
    print(f"# {machine_line()}; {started}", file=sys.stderr)

    torch.manual_seed(0)
    orig = torchvision.models.resnet50(weights=None).eval()
    gm = mt.mgicify(orig, torch.zeros(1, 3, 224, 224), group_size=32, coarsest_width=64,
                    rule="compact").eval()  # the network the ablation was measured on (version 0.1's rule)
    orig.to(memory_format=fmt)
    gm.to(memory_format=fmt)
    x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=fmt)
    inputs = block_inputs(gm, x)
    blocks = {n: m for n, m in gm.named_modules() if isinstance(m, mt.MGICBlock)}

    variants: dict[str, nn.Module] = {}
    if args.ablation:
        off = {"inplace": False, "matmul_1x1": False, "iadd": False}
        variants = {
            "original": orig,
            "original + mt.fold_batchnorm": mt.fold_batchnorm(orig),
            BASELINE: with_blocks(gm, **off),
            "MGIC baseline + grouped 1x1 as matmul": with_blocks(gm, **{**off, "matmul_1x1": True}),
            "MGIC baseline + in-place residual/correction": with_blocks(gm, **{**off, "inplace": True}),
            "MGIC baseline + `+=` traced in place": with_blocks(gm, **{**off, "iadd": True}),
            "MGIC (package: all three)": gm,
            "MGIC + mt.fold_batchnorm": mt.fold_batchnorm(gm),
        }
        with torch.inference_mode():
            ref = gm(x)
            for k, net in variants.items():
                if k.startswith("MGIC"):
                    err = (net(x) - ref).abs().max().item() / ref.abs().max().item()
                    if err > 1e-4:
                        raise SystemExit(f"{k} differs from the package MGIC network: relative error {err:.2e}")

    base = BASELINE
    # per block: the module at the block's path in each network (the folded original is traced through, so its
    # bottlenecks are folded one by one instead)
    per_block: dict[str, Callable[[str], nn.Module]] = {"orig": orig.get_submodule, "mgic": gm.get_submodule}
    if variants:
        per_block.update(baseline=variants[base].get_submodule,
                         orig_folded=lambda n: mt.fold_batchnorm(orig.get_submodule(n)),
                         folded=variants["MGIC + mt.fold_batchnorm"].get_submodule)
    rows = []
    totals: dict[str, float] = defaultdict(float)
    for n, b in blocks.items():
        xin = inputs[n]
        fns = {k: (lambda m=block_at(n), xin=xin: m(xin)) for k, block_at in per_block.items()}
        t = timeit(fns, rounds)
        for k, v in t.items():
            totals[k] += v
        t = {k: 1e3 * v for k, v in t.items()}
        lv = "/".join(str(lvl) for lvl in gm.meta["mgic"].rewritten[[d.module for d in gm.meta["mgic"].rewritten].index(n)].levels)
        row = f"| {n} | {tuple(xin.shape[1:])} | {lv} | {t['orig']:.2f} | {t['mgic']:.2f} | {t['mgic'] / t['orig']:.2f} |"
        if variants:
            row += (f" {t['baseline']:.2f} | {t['mgic'] / t['baseline']:.2f} | {t['orig_folded']:.2f} | {t['folded']:.2f} | "
                    f"{t['folded'] / t['orig_folded']:.2f} |")
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    t = {k: 1e3 * v for k, v in totals.items()}
    tot = f"| **sum** | | | {t['orig']:.1f} | {t['mgic']:.1f} | {t['mgic'] / t['orig']:.2f} |"
    if variants:
        tot += (f" {t['baseline']:.1f} | {t['mgic'] / t['baseline']:.2f} | {t['orig_folded']:.1f} | {t['folded']:.1f} | "
                f"{t['folded'] / t['orig_folded']:.2f} |")
    rows.append(tot)

    net_rows = []
    if variants:
        t = timeit({k: (lambda net=net: net(x)) for k, net in variants.items()}, 2 * rounds)  # small differences
        for k, v in t.items():
            net_rows.append(f"| {k} | {1e3 * v:.1f} | {v / t['original']:.2f} | {v / t[base]:.2f} |")

    reps = 1 if args.quick else 3
    parts = part_table(blocks, inputs, reps)
    ops = op_table(blocks, inputs, reps, top=15)

    out = [
        *preamble("MGICBlock CPU profile: ResNet-50, s_g=32, s_c=64", started),
        f"- batch {args.batch}x3x{size}x{size}, eval, inference_mode, "
        f"{'channels_last' if args.channels_last else 'NCHW (contiguous)'}; block times are medians of {rounds} "
        "interleaved rounds on the block's real input",
        "",
        "## Per block",
        "",
        "| block | input (C, H, W) | level widths | original ms | MGIC ms | MGIC / orig |"
        + (" baseline MGIC ms | MGIC / baseline | orig BN-folded ms | MGIC folded ms | folded / orig folded |"
           if variants else ""),
        "|---|---|---|--:|--:|--:|" + ("--:|--:|--:|--:|--:|" if variants else ""),
        *rows,
    ]
    if net_rows:
        out += ["", f"## Whole network, batch {args.batch} (ablation: each change alone, then all three, then BN folding; "
                "same outputs, checked to 1e-4 relative)", "",
                "| network | ms | / original | / MGIC baseline |", "|---|--:|--:|--:|", *net_rows]
    out += ["", "## Per part (all 12 MGIC blocks, one network pass; profiler time, so slightly inflated)", "",
            "| part | ms | share |", "|---|--:|--:|", *parts,
            "", "## Per op (all 12 MGIC blocks, one network pass, by self CPU time)", "",
            "| op | calls | self ms | share |", "|---|--:|--:|--:|", *ops]
    md = "\n".join(out) + "\n"
    name = "profile_mgic_block_channels_last.md" if args.channels_last else "profile_mgic_block.md"
    emit(md, RESULTS / name if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
