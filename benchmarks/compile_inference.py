"""The torch.compile inference path: how much faster, and what does compiling cost?

An MGIC network runs ~3x more, smaller ops than the original (``op_count.py``), and in
eager mode the time outside the ops is a large share of its latency. The deployment path
offered for that is::

    fast = mt.optimize_for_inference(gm, x, compile=True)   # BN folded, torch.compile, weights frozen
    fast(x)                                                  # compiled already, on the example input

``optimize_for_inference`` folds every eval BatchNorm (into the conv before it, and
``N_j`` into ``P_j``), compiles with inductor (``dynamic=False``) and ``freezing=True``
(weights become constants: inductor pre-packs them for oneDNN). The variant
``compile`` is the earlier documented path, ``torch.compile(mt.fold_batchnorm(gm))``
without freezing, kept to show what freezing buys. Neither changes the math: every
compiled output is checked against the eager network (relative error < 1e-4).

For the original and the MGIC network (with ``--peer`` also the Torch-Pruning peer at
the MGIC FLOPs, as in ``speed.py``), all BN-folded: eager vs compiled latency, interleaved
in one process (median of ``--rounds``), per input size, batch size and thread count, and
the wall time of the first (compiling) call. Compilation is per batch size
(``dynamic=False``), so each batch size pays it once.

Usage::

    python benchmarks/compile_inference.py --write            # resnet50, 224 px, threads 1 and all cores, batch 1 and 8,
                                                              #   both variants: 16 compiles, ~30-50 min on 2 cores
    python benchmarks/compile_inference.py --models mobilenet_v3_large --sizes 160 224 --threads 2
    python benchmarks/compile_inference.py --transitions --threads 2 --write   # the paper's MGIC-ResNet-50
    python benchmarks/compile_inference.py --device cuda --write
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn
from torch._inductor.utils import fresh_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved, load_line, median, preamble  # noqa: E402
from speed import CASES, inference_fn, pruned_to_flops, sync  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("compile", "freezing")  # torch.compile(fold_batchnorm(m)); mt.optimize_for_inference(m, x, compile=True)


def build_nets(name: str, args: argparse.Namespace) -> dict[str, nn.Module]:
    """The original, its MGIC network and (``--peer``) the pruned peer, eval mode. ``toy``: ``deploy.Toy``, s_g 4, s_c 8."""
    torch.manual_seed(0)
    if name == "toy":
        from deploy import Toy

        orig, (s_g, s_c), example = Toy().eval(), (4, 8), torch.zeros(1, 3, 32, 32)
    else:
        orig, (s_g, s_c) = torchvision.models.get_model(name, weights=None).eval(), CASES[name]
        example = torch.zeros(1, 3, 224, 224)
    gm = mt.mgicify(orig, example, group_size=s_g, coarsest_width=s_c, rule=args.rule,
                    transitions=args.transitions).eval()
    nets = {"original": orig, "MGIC": gm}
    if args.peer:
        nets["pruned peer"] = pruned_to_flops(orig, example, mt.compare(orig, gm, example).flops_ratio)
    return {k: m.to(args.device) for k, m in nets.items()}


def compile_variant(variant: str, model: nn.Module, folded: nn.Module, x: torch.Tensor,
                    args: argparse.Namespace) -> tuple[nn.Module, float]:
    """One compiled network and the wall time of its first (compiling) call; its output checked against eager."""
    cache = contextlib.nullcontext() if args.warm_cache else fresh_cache()
    t0 = time.perf_counter()
    with cache:
        if variant == "freezing":
            compiled = mt.optimize_for_inference(model, x, compile=True, channels_last=False, check=False)
        else:
            compiled = torch.compile(folded, dynamic=False)
        with torch.inference_mode():
            out = compiled(x)
            sync(x.device)
    seconds = time.perf_counter() - t0
    with torch.inference_mode():
        ref = folded(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    if err > 1e-4:
        raise SystemExit(f"{variant}: compiled output differs from eager, relative error {err:.2e}")
    return compiled, seconds


def measure(name: str, nets: dict[str, nn.Module], eager: dict[str, nn.Module], size: int, threads: int, bs: int,
            args: argparse.Namespace) -> list[str]:
    """Rows of one model at one input size, thread count and batch size: every network eager and compiled per variant."""
    torch.set_num_threads(threads)
    load = load_line()
    torch._dynamo.reset()
    x = torch.randn(bs, 3, size, size, device=args.device)
    fns = {("eager", k): inference_fn(m, x) for k, m in eager.items()}
    compile_s = {}
    for variant in args.variants:
        for k, m in nets.items():
            compiled, compile_s[(variant, k)] = compile_variant(variant, m, eager[k], x, args)
            fns[(variant, k)] = inference_fn(compiled, x)
            print(f"  {name} {size}px {threads} thr batch {bs} {k}, {variant}: compiled in {compile_s[(variant, k)]:.1f} s",
                  file=sys.stderr, flush=True)
    ms = {k: 1e3 * median(v) for k, v in interleaved(fns, args.rounds, 1).items()}
    rows = []
    for variant in args.variants:
        for k in nets:
            c = ms[(variant, k)]
            rows.append(f"| {name} | {size} | {threads} | {bs} | {k} | {variant} | {ms[('eager', k)]:.1f} | {c:.1f} | "
                        f"{c / ms[('eager', k)]:.2f} | {c / ms[(variant, 'original')]:.2f} | "
                        f"{compile_s[(variant, k)]:.1f} | {load} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(CASES) + ["toy"], default=["resnet50"])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="input height and width (default 224)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help=f"default 1 {cores}")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="compile: torch.compile(mt.fold_batchnorm(m)); freezing: mt.optimize_for_inference(compile=True) "
                        "(default both; --quick: freezing)")
    p.add_argument("--rounds", type=int, default=None, help="default 6")
    p.add_argument("--rule", default="paper", help="mgicify's hierarchy rule (paper or compact)")
    p.add_argument("--peer", action="store_true", help="also the Torch-Pruning peer at the MGIC FLOPs (one more compile each)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="the toy CNN of deploy.py at 32 px, 1 thread, batch 1, 2 rounds, variant freezing")
    p.add_argument("--transitions", action="store_true",
                   help="mgicify(transitions=True), the paper's MGIC-ResNet-50; writes compile_inference_transitions.md")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse inductor's on-disk cache of compiled kernels (default: a fresh, empty cache per compile, "
                        "so compile s is what a first run costs)")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/compile_inference[_cuda].md")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.peer, args.sizes = ["toy"], False, [32]
    args.sizes = args.sizes or [224]
    args.variants = args.variants or (["freezing"] if args.quick else list(VARIANTS))
    args.threads = args.threads or ([1] if args.quick else sorted({1, cores}))
    args.batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 8])
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.device = torch.device(args.device)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = load_line()
    rows = []
    for name in args.models:
        nets = build_nets(name, args)
        eager = {k: mt.fold_batchnorm(m) for k, m in nets.items()}
        for size in args.sizes:
            for threads in args.threads:
                for bs in args.batch_sizes:
                    rows += measure(name, nets, eager, size, threads, bs, args)
    dev = args.device
    out = [
        *preamble("torch.compile inference path: original vs MGIC" + (" vs pruned peer" if args.peer else ""), started),
        "- load per row below (at the start of that row's compiles)" + (f"; GPU {torch.cuda.get_device_name(dev)}"
                                                                       if dev.type == "cuda" else ""),
        f"- MGIC: s_g / s_c as in speed.py, rule {args.rule}, transitions={args.transitions}; eval, inference_mode, NCHW; "
        "eager = BN-folded (`mt.fold_batchnorm`); variant `compile` = `torch.compile(mt.fold_batchnorm(m), dynamic=False)`, "
        "`freezing` = `mt.optimize_for_inference(m, x, compile=True)` (the same plus inductor `freezing=True`); medians of "
        f"{args.rounds} interleaved rounds of every network and variant; compile s = wall time of the first call (one "
        "compile per input shape, " + ("inductor's on-disk cache reused: a repeat run" if args.warm_cache else
                                       "an empty inductor cache: a first run")
        + "); compiled outputs checked against eager (< 1e-4)",
        "",
        "| model | px | threads | batch | network | variant | eager ms | compiled ms | compiled / eager | "
        "compiled / original compiled | compile s | load |",
        "|---|--:|--:|--:|---|---|--:|--:|--:|--:|--:|---|",
        *rows,
    ]
    name = f"compile_inference{'_transitions' if args.transitions else ''}{'_cuda' if dev.type == 'cuda' else ''}.md"
    emit("\n".join(out) + "\n", RESULTS / name if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
