"""The ``.pt2`` deployment path: an MGIC network compiled ahead of time, against the original compiled the same way.

``mt.export_pt2(model, x, path)`` folds every eval BatchNorm, exports the network with
``torch.export`` (batch dimension dynamic) and compiles it with AOTInductor (inductor
``freezing=True``) into one ``.pt2`` file; ``mt.load_pt2(path)`` loads it in any process
without recompiling. For the original network and its MGIC version (rule paper; ResNet-50
``s_g=32, s_c=64``, MobileNetV3-Large ``8/16``, as in ``speed.py``), per input size and
thread count (AOTInductor's CPU kernels are built for the thread count they are compiled
at, so each thread count gets its own file), this script measures:

* the wall time of ``export_pt2`` (export + C++ build; inductor's on-disk cache emptied
  first unless ``--warm-cache``) and the size of the file;
* the loaded ``.pt2``'s latency at every batch size (one file serves all: dynamic batch),
  interleaved in one process with the original's ``.pt2`` and both eager BN-folded
  networks; outputs checked against eager (relative error < 1e-3).

The targets: MGIC ResNet-50's ``.pt2`` at most 0.8x the original's ``.pt2``, MobileNetV3-Large's
at most 1.0x.

Usage::

    python benchmarks/deploy.py --write                 # both models, 160 and 224 px, 1 and 2 threads, batch 1 and 8:
                                                        #   16 AOTInductor builds, ~45-90 min on 2 cores
    python benchmarks/deploy.py --models resnet50 --sizes 224 --threads 2
    python benchmarks/deploy.py --quick                 # a toy CNN at 32 px, 1 thread: checks the plumbing, ~1-2 min
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved, load_line, median, preamble  # noqa: E402
from speed import CASES  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"resnet50": 0.8, "mobilenet_v3_large": 1.0}  # MGIC .pt2 / original .pt2


class Toy(nn.Module):
    """stem -> one residual conv-BN block of width 32 -> pooled linear head: ``--quick``'s network."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def build(name: str, rule: str) -> dict[str, nn.Module]:
    """The original (eval) and its MGIC network (rule ``rule``, s_g / s_c as in ``speed.py``)."""
    torch.manual_seed(0)
    if name == "toy":
        orig, (s_g, s_c), example = Toy().eval(), (4, 8), torch.zeros(1, 3, 32, 32)
    else:
        orig, (s_g, s_c), example = torchvision.models.get_model(name, weights=None).eval(), CASES[name], \
            torch.zeros(1, 3, 224, 224)
    gm = mt.mgicify(orig, example, group_size=s_g, coarsest_width=s_c, rule=rule).eval()
    return {"original": orig, "MGIC": gm}


def export_timed(model: nn.Module, x: torch.Tensor, path: Path, warm_cache: bool) -> tuple[Any, float, float]:
    """``mt.export_pt2`` (checked against eager) and ``mt.load_pt2``: the loaded package, build seconds, file MB."""
    from torch._inductor.utils import fresh_cache

    cache = contextlib.nullcontext() if warm_cache else fresh_cache()
    t0 = time.perf_counter()
    with cache:
        mt.export_pt2(model, x, path)
    seconds = time.perf_counter() - t0
    return mt.load_pt2(path), seconds, path.stat().st_size / 2**20


def runner(fn: Callable[..., Any], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            fn(x)
    return run


def measure(name: str, nets: dict[str, nn.Module], size: int, threads: int, args: argparse.Namespace,
            folder: Path) -> list[str]:
    """Table rows of one model at one input size and thread count (one ``.pt2`` per network)."""
    torch.set_num_threads(threads)
    load = load_line()
    example = torch.randn(1, 3, size, size)
    pt2, build_s, mb = {}, {}, {}
    for k, m in nets.items():
        pt2[k], build_s[k], mb[k] = export_timed(m, example, folder / f"{name}_{k}_{size}px_{threads}t.pt2",
                                                 args.warm_cache)
        print(f"  {name} {size}px {threads} thr {k}: export_pt2 {build_s[k]:.0f} s, {mb[k]:.1f} MB", file=sys.stderr,
              flush=True)
    eager = {k: mt.fold_batchnorm(m) for k, m in nets.items()}
    rows = []
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, size, size)
        with torch.inference_mode():
            for k in nets:
                want, got = eager[k](x), pt2[k](x)
                err = ((got - want).abs().max() / want.abs().max()).item()
                if err > 1e-3:
                    raise SystemExit(f"{name} {k} batch {bs}: the .pt2 differs from eager (relative error {err:.2e})")
        fns = {("pt2", k): runner(p, x) for k, p in pt2.items()}
        fns.update({("eager", k): runner(m, x) for k, m in eager.items()})
        ms = {k: 1e3 * median(v) for k, v in interleaved(fns, args.rounds, 1).items()}
        for k in nets:
            rows.append(f"| {name} | {size} | {threads} | {bs} | {k} | {ms[('eager', k)]:.2f} | {ms[('pt2', k)]:.2f} | "
                        f"{ms[('pt2', k)] / ms[('eager', k)]:.2f} | {ms[('pt2', k)] / ms[('pt2', 'original')]:.2f} | "
                        f"{build_s[k]:.0f} | {mb[k]:.1f} | {load} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def targets(rows: list[str]) -> list[str]:
    """MGIC ``.pt2`` / original ``.pt2`` per setting, against the model's target."""
    out = ["| model | px | threads | batch | MGIC .pt2 / original .pt2 | target | met |", "|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        c = [x.strip() for x in r.strip("|").split("|")]
        if c[4] == "MGIC" and c[0] in TARGETS:
            ratio, limit = float(c[8]), TARGETS[c[0]]
            out.append(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {ratio:.2f} | {limit} | {'yes' if ratio <= limit else '**no**'} |")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(CASES) + ["toy"], default=sorted(CASES))
    p.add_argument("--rule", default="paper", choices=["paper", "compact"])
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warm-cache", action="store_true", help="reuse inductor's on-disk cache (build s of a repeat run)")
    p.add_argument("--keep", type=Path, default=None, help="keep the .pt2 files in this folder (default: a temp folder)")
    p.add_argument("--quick", action="store_true", help="the toy CNN at 32 px, 1 thread, batch 1 and 3, 3 rounds")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/deploy.md")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.sizes, args.threads, args.batch_sizes, args.rounds = ["toy"], [32], [1], [1, 3], 3
    started = load_line()
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            nets = build(name, args.rule)
            for size in args.sizes:
                for threads in args.threads:
                    rows += measure(name, nets, size, threads, args, folder)
    out = [*preamble("The .pt2 path: export_pt2 (torch.export + AOTInductor), original vs MGIC", started),
           f"- rule {args.rule}; s_g / s_c as in speed.py; every network BN-folded, eval, batch dynamic in one .pt2 per "
           "network, input size and thread count; inductor freezing=True; latency = median of "
           f"{args.rounds} interleaved rounds of every network (.pt2 and eager BN-folded), inference_mode, NCHW; build s = "
           "wall time of export_pt2 with " + ("inductor's cache reused" if args.warm_cache else "an empty inductor cache")
           + "; outputs checked against eager (< 1e-3)",
           "", "## Targets", "", *targets(rows), "", "## Latency",
           "", "| model | px | threads | batch | network | eager folded ms | .pt2 ms | .pt2 / eager | .pt2 / original .pt2 "
           "| build s | .pt2 MB | load |", "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|---|", *rows]
    emit("\n".join(out) + "\n", RESULTS / "deploy.md" if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
