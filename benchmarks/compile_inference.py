"""The torch.compile inference path: how much faster, and what does compiling cost?

An MGIC network runs ~3x more, smaller ops than the original, and about half of
its inference time at 2 threads is memory-bound element-wise work (BatchNorm,
ReLU, the residual and correction adds; ``profile_network.py``). The deployment
path offered for that is::

    fast = torch.compile(mt.fold_batchnorm(gm))   # fold eval BatchNorms, then let inductor fuse the rest
    with torch.inference_mode():
        fast(x)                                    # the first call compiles (timed here)

``mt.fold_batchnorm`` removes every eval BatchNorm (into the conv before it, and
``N_j`` into ``P_j``); inductor then fuses the remaining element-wise ops into
the kernels around them. Neither changes the math: every compiled output is
checked against the eager network (relative error < 1e-4).

For the original and the MGIC network (with ``--peer`` also the Torch-Pruning peer at
the MGIC FLOPs, as in ``speed.py``), all BN-folded: eager vs compiled latency, interleaved
in one process (median of ``--rounds``), per batch size and thread count, and the
wall time of the first (compiling) call. Compilation is per batch size
(``dynamic=False``), so each batch size pays it once.

Usage::

    python benchmarks/compile_inference.py --write            # resnet50, threads 1 and all cores, batch 1 and 8
    python benchmarks/compile_inference.py --models mobilenet_v3_large --threads 2
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
from torch._inductor.utils import fresh_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import code_version, emit, interleaved, load_line, machine_line, median  # noqa: E402
from speed import CASES, inference_fn, pruned_to_flops, sync  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: Optional[list[str]] = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=["resnet50"])
    p.add_argument("--threads", type=int, nargs="+", default=None, help=f"default 1 {cores}")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8")
    p.add_argument("--rounds", type=int, default=None, help="default 6")
    p.add_argument("--rule", default="paper", help="mgicify's hierarchy rule (paper or compact)")
    p.add_argument("--peer", action="store_true", help="also the Torch-Pruning peer at the MGIC FLOPs (one more compile each)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="mobilenet_v3_large, 1 thread, batch 1, 2 rounds")
    p.add_argument("--transitions", action="store_true",
                   help="mgicify(transitions=True), the paper's MGIC-ResNet-50; writes compile_inference_transitions.md")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse inductor's on-disk cache of compiled kernels (default: a fresh, empty cache per compile, "
                        "so compile s is what a first run costs)")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/compile_inference[_cuda].md")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.peer = ["mobilenet_v3_large"], False
    args.threads = args.threads or ([1] if args.quick else sorted({1, cores}))
    args.batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 8])
    args.rounds = args.rounds or (2 if args.quick else 6)
    dev = torch.device(args.device)
    started = load_line()
    rows = []
    for name in args.models:
        s_g, s_c = CASES[name]
        torch.manual_seed(0)
        orig = torchvision.models.get_model(name, weights=None).eval()
        example = torch.zeros(1, 3, 224, 224)
        gm = mt.mgicify(orig, example, group_size=s_g, coarsest_width=s_c, rule=args.rule,
                        transitions=args.transitions).eval()
        nets = {"original": orig, "MGIC": gm}
        if args.peer:
            nets["pruned peer"] = pruned_to_flops(orig, example, mt.compare(orig, gm, example).flops_ratio)
        eager = {k: mt.fold_batchnorm(m).to(dev) for k, m in nets.items()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bs in args.batch_sizes:
                load = load_line()
                torch._dynamo.reset()
                x = torch.randn(bs, 3, 224, 224, device=dev)
                compiled, compile_s = {}, {}
                for k, m in eager.items():
                    c = torch.compile(m, dynamic=False)
                    cache = contextlib.nullcontext() if args.warm_cache else fresh_cache()
                    t0 = time.perf_counter()
                    with cache, torch.inference_mode():
                        out = c(x)
                        sync(dev)
                    compile_s[k] = time.perf_counter() - t0
                    with torch.inference_mode():
                        ref = m(x)
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                    if err > 1e-4:
                        raise SystemExit(f"{name} {k}: compiled output differs from eager, relative error {err:.2e}")
                    compiled[k] = c
                    print(f"  {name} {threads} thr batch {bs} {k}: compiled in {compile_s[k]:.1f} s", file=sys.stderr,
                          flush=True)
                fns = {("eager", k): inference_fn(m, x) for k, m in eager.items()}
                fns.update({("compiled", k): inference_fn(m, x) for k, m in compiled.items()})
                t = interleaved(fns, args.rounds, 1)
                ms = {k: 1e3 * median(v) for k, v in t.items()}
                for k in eager:
                    rows.append(f"| {name} | {threads} | {bs} | {k} | {ms[('eager', k)]:.1f} | {ms[('compiled', k)]:.1f} | "
                                f"{ms[('compiled', k)] / ms[('eager', k)]:.2f} | "
                                f"{ms[('compiled', k)] / ms[('compiled', 'original')]:.2f} | {compile_s[k]:.1f} | {load} |")
                    print(rows[-1], file=sys.stderr, flush=True)
    out = [
        "# torch.compile inference path: fold_batchnorm + torch.compile, original vs MGIC"
        + (" vs pruned peer" if args.peer else ""),
        "",
        f"- machine: {machine_line()}" + (f"; GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""),
        f"- code: {code_version()}",
        f"- load: {started} at start, {load_line()} at end; per row below (at the start of that row's compile)",
        f"- MGIC: s_g / s_c as in speed.py, rule {args.rule}, transitions={args.transitions}; every network BN-folded (`mt.fold_batchnorm`), eval, inference_mode, NCHW, 224x224; medians of {args.rounds} "
        "interleaved rounds of every network, eager and compiled; compile s = wall time of the first call "
        "(dynamo + inductor, `dynamic=False`, one compile per batch size, "
        + ("inductor's on-disk cache reused: a repeat run" if args.warm_cache else "an empty inductor cache: a first run")
        + "); compiled outputs checked against eager (< 1e-4)",
        "",
        "| model | threads | batch | network | eager ms | compiled ms | compiled / eager | compiled / original compiled "
        "| compile s | load |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|---|",
        *rows,
    ]
    md = "\n".join(out) + "\n"
    name = f"compile_inference{'_transitions' if args.transitions else ''}{'_cuda' if dev.type == 'cuda' else ''}.md"
    emit(md, RESULTS / name if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
