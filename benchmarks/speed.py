"""CPU speed and memory of original vs MGIC models (inference latency, training step, peak memory).

Cases (torchvision, random init):

* ``resnet50`` with ``group_size=32, coarsest_width=64`` (the paper's ImageNet setting);
* ``mobilenet_v3_large`` with ``group_size=8, coarsest_width=16``: its residual
  blocks are only 24..160 channels wide, so ``s_g = s_c = 32`` leaves 7 of its 10
  blocks alone (the MGIC version would not be smaller); ``8/16`` rewrites 9 of 10.

Measured, for each case, in one process with original and MGIC *interleaved*
(round ``r`` times both models, alternating which goes first) and the median
over rounds reported:

* inference latency: ``eval()``, ``torch.inference_mode()``, batch 1 and 8, 224x224;
* inference latency with both networks' eval BatchNorms folded into their
  convolutions (``mgic_transform.fold_batchnorm`` on each; the original is traced
  with the compiler's tracer first), at the largest inference batch;
* training step: ``train()``, SGD (momentum 0.9), cross-entropy on random labels,
  ``zero_grad`` + forward + backward + step, batch 8.

Peak memory is measured separately (not while timing) with ``torch.profiler``
(``profile_memory=True``): every allocation and free made through PyTorch's CPU
allocator is recorded with the allocator's running total of live bytes, and the
peak is the largest running total seen during one inference forward / one
training step. The count starts at zero when the profiler starts, so it is the
memory *added* by the step on top of what already exists (weights, BN buffers,
momentum buffers): activations, tensors saved for backward, gradients (they are
set to ``None`` before the step) and kernel workspaces that PyTorch allocates
(oneDNN scratchpads go through the same allocator). Unlike ``ru_maxrss`` it is
exact, deterministic, per step and unaffected by the allocator keeping freed
pages; unlike ``tracemalloc`` it sees tensor storage. Weights are reported
beside it (parameters + buffers).

FLOP ratios are fvcore's via ``mgic_transform.compare`` (1 multiply-add = 1 FLOP).

Usage::

    python benchmarks/speed.py                   # both models, default repeats
    python benchmarks/speed.py --quick           # 2 rounds, batch 1 inference + batch 2 training
    python benchmarks/speed.py --models resnet50 --channels-last --write
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import code_version, emit, interleaved, load_line, machine_line, median  # noqa: E402

import mgic_transform as mt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {  # model -> (group_size, coarsest_width)
    "resnet50": (32, 64),
    "mobilenet_v3_large": (8, 16),
}


@dataclass
class Line:
    model: str
    what: str
    orig: float
    mgic: float
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.mgic / self.orig


def inference_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    run.opt = opt  # type: ignore[attr-defined]
    return run


def peak_allocated(fn: Callable[[], None]) -> int:
    """Largest number of bytes live in PyTorch's CPU allocator during ``fn()``, counted from zero at its start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
        stack.extend(e.children)
    if not events:
        return 0
    events.sort()
    # The allocator's running total also counts tensors allocated under an *earlier* profiler session that are
    # still alive (e.g. the gradients of the previous step): subtract the total as it stood before this session's
    # first event.
    _, size, total = events[0]
    baseline = total - size
    return max(t for _, _, t in events) - baseline


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run_case(name: str, args: argparse.Namespace) -> tuple[list[Line], dict]:
    s_g, s_c = CASES[name]
    torch.manual_seed(0)
    orig = torchvision.models.get_model(name, weights=None)
    t0 = time.perf_counter()
    gm = mt.mgicify(orig, torch.zeros(1, 3, 224, 224), group_size=s_g, coarsest_width=s_c, transitions=args.transitions)
    t_transform = time.perf_counter() - t0
    report = mt.compare(orig, gm, torch.zeros(1, 3, 224, 224))
    plan = gm.meta["mgic"]
    info = dict(model=name, s_g=s_g, s_c=s_c, blocks=f"{len(plan.rewritten)} / {len(plan.blocks)}",
                params=(report.params_before, report.params_after), flops=(report.flops_before, report.flops_after),
                transform_s=t_transform)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {"orig": orig, "mgic": gm}
    for m in models.values():
        m.to(memory_format=fmt)
    lines: list[Line] = []
    flops_ratio = report.flops_ratio

    for m in models.values():
        m.eval()
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, 224, 224).contiguous(memory_format=fmt)
        t = interleaved({k: inference_fn(m, x) for k, m in models.items()}, args.rounds, args.warmup)
        lines.append(Line(name, f"inference latency, batch {bs}", 1e3 * median(t["orig"]), 1e3 * median(t["mgic"]), "ms",
                          f"FLOPs x{flops_ratio:.3f}"))
        print(f"  {lines[-1].what}: {lines[-1].orig:.1f} / {lines[-1].mgic:.1f} ms", file=sys.stderr, flush=True)
    mems = {k: peak_allocated(inference_fn(m, torch.randn(args.batch_sizes[-1], 3, 224, 224).contiguous(memory_format=fmt)))
            for k, m in models.items()}
    lines.append(Line(name, f"peak memory, inference batch {args.batch_sizes[-1]}", mems["orig"] / 2**20, mems["mgic"] / 2**20,
                      "MiB", "activations + workspaces"))
    if not args.no_fold:  # deployment: both networks with their eval BatchNorms folded into the convolutions
        folded = {k: mt.fold_batchnorm(m) for k, m in models.items()}
        bs = args.batch_sizes[-1]
        x = torch.randn(bs, 3, 224, 224).contiguous(memory_format=fmt)
        t = interleaved({k: inference_fn(m, x) for k, m in folded.items()}, args.rounds, args.warmup)
        lines.append(Line(name, f"inference latency, batch {bs}, both BN-folded", 1e3 * median(t["orig"]),
                          1e3 * median(t["mgic"]), "ms", "mt.fold_batchnorm on each"))
        print(f"  {lines[-1].what}: {lines[-1].orig:.1f} / {lines[-1].mgic:.1f} ms", file=sys.stderr, flush=True)

    for m in models.values():
        m.train()
    bs = args.train_batch
    x = torch.randn(bs, 3, 224, 224).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (bs,))
    fns = {k: train_fn(m, x, y) for k, m in models.items()}
    t = interleaved(fns, max(2, args.rounds // 2), args.warmup)  # training steps are ~4x longer
    lines.append(Line(name, f"training step, batch {bs}", 1e3 * median(t["orig"]), 1e3 * median(t["mgic"]), "ms",
                      f"FLOPs x{flops_ratio:.3f} (forward)"))
    print(f"  {lines[-1].what}: {lines[-1].orig:.1f} / {lines[-1].mgic:.1f} ms", file=sys.stderr, flush=True)
    mems = {}
    for k, fn in fns.items():
        fn.opt.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        mems[k] = peak_allocated(fn)
    lines.append(Line(name, f"peak memory, training step batch {bs}", mems["orig"] / 2**20, mems["mgic"] / 2**20, "MiB",
                      "activations + saved tensors + grads + workspaces"))
    lines.append(Line(name, "weights (params + buffers)", state_bytes(orig) / 2**20, state_bytes(gm) / 2**20, "MiB",
                      f"params x{report.params_ratio:.3f}"))
    return lines, info


def to_markdown(all_lines: list[Line], infos: list[dict], args: argparse.Namespace, started: str) -> str:
    out = [
        "# CPU speed and memory: original vs MGIC",
        "",
        f"- machine: {machine_line()}",
        f"- code: {code_version()}",
        f"- load: {started} at start, {load_line()} at end (other jobs share these 2 cores: compare ratios, "
        "which interleaving protects, more than absolute times)",
        f"- mgicify: transitions={args.transitions}",
        f"- memory format: {'channels_last' if args.channels_last else 'contiguous (NCHW)'}; input 224x224; "
        f"times are medians of {args.rounds} interleaved rounds for inference, {max(2, args.rounds // 2)} for training, "
        f"after {args.warmup} warm-up call(s)",
        "- peak memory: torch.profiler allocator total, counted from zero at the start of the step (see script docstring)",
        "",
        "| model | s_g / s_c | blocks rewritten | params | FLOPs (fvcore, 1 MAC = 1 FLOP) | mgicify s |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for i in infos:
        (pb, pa), (fb, fa) = i["params"], i["flops"]
        out.append(f"| {i['model']} | {i['s_g']} / {i['s_c']} | {i['blocks']} | {pb / 1e6:.2f}M -> {pa / 1e6:.2f}M "
                   f"(x{pa / pb:.3f}) | {fb / 1e9:.3f}G -> {fa / 1e9:.3f}G (x{fa / fb:.3f}) | {i['transform_s']:.1f} |")
    out += ["", "| model | measurement | original | MGIC | MGIC / original | for reference |", "|---|---|--:|--:|--:|---|"]
    for ln in all_lines:
        out.append(f"| {ln.model} | {ln.what} | {ln.orig:.1f} {ln.unit} | {ln.mgic:.1f} {ln.unit} | {ln.ratio:.2f} | {ln.note} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--channels-last", action="store_true", help="run both models and inputs in channels_last")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds for inference (training: half); default 8")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="inference batch sizes (default 1 8)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch size (default 8)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on a shared 2-core machine multi-threaded ops stall at "
                        "every barrier when another job holds a core; see README)")
    p.add_argument("--no-fold", action="store_true", help="skip the BN-folded inference comparison")
    p.add_argument("--transitions", action="store_true",
                   help="mgicify(transitions=True): also rewrite the width-changing blocks (the paper's MGIC-ResNet-50)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up, batch 1 inference, batch 2 training")
    p.add_argument("--write", action="store_true", help="also write benchmarks/results/speed[_channels_last].md")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 8)
    args.batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 8])
    args.train_batch = args.train_batch or (2 if args.quick else 8)
    if args.quick:
        args.warmup = 1
    torch.set_num_threads(args.threads)

    started = load_line()
    print(f"# {machine_line()}; {started}", file=sys.stderr)
    all_lines, infos = [], []
    for name in args.models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        lines, info = run_case(name, args)
        all_lines += lines
        infos.append(info)
    md = to_markdown(all_lines, infos, args, started)
    name = "speed" + ("_transitions" if args.transitions else "") + ("_channels_last" if args.channels_last else "") + ".md"
    emit(md, RESULTS / name if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
