"""Speed and memory of original vs MGIC vs a pruned peer, at the settings users run.

Cases (torchvision, random init):

* ``resnet50`` with ``group_size=32, coarsest_width=64`` (the paper's ImageNet setting);
* ``mobilenet_v3_large`` with ``group_size=8, coarsest_width=16``: its residual
  blocks are only 24..160 channels wide, so ``s_g = s_c = 32`` leaves 7 of its 10
  blocks alone (the MGIC version would not be smaller); ``8/16`` rewrites 9 of 10.

Every case is transformed under each hierarchy rule (``--rules paper compact``;
where ``mgicify`` has no ``rule=`` argument yet, once, with today's grouping,
which is the compact rule). One table per **setting** = model x rule x intra-op
threads (``--threads 1 N``, default 1 and all cores) x memory format (NCHW and
channels-last). Columns:

* **original**: the torchvision network;
* **MGIC**: ``mgicify(...)``;
* **MGIC ckpt**: the same network with ``checkpoint=True`` (activation
  checkpointing per block; training rows only: without autograd it is the MGIC column);
* **pruned peer**: Torch-Pruning (``MetaPruner``, L2 magnitude, uniform per-layer
  ratio, channels rounded to 8, classifier kept) pruned step by step until its
  FLOPs are at most the MGIC network's. This is the network a user compares
  against: a dense network of the same FLOPs.

Rows: inference latency (``eval()``, ``torch.inference_mode()``) at batch 1 and 8,
inference at the largest batch with every network's eval BatchNorms folded
(``mgic_transform.fold_batchnorm``), the training step (SGD with momentum,
cross-entropy, ``zero_grad`` + forward + backward + step, batch 8), the same step
with every network under ``torch.compile`` (NCHW tables of the first rule only: each
compile of a training step takes 1-4 minutes on 2 cores; its first, compiling step is
timed separately; ``--no-compile`` skips it), and peak memory of one inference
forward and one training step. All networks of a row are
timed *interleaved* in one process (round ``r`` times each, alternating the
order) and the median over rounds is reported, so load from other jobs hits all
columns alike; the load average is recorded with every table.

Peak memory on CPU is measured with ``torch.profiler`` (``profile_memory=True``):
the peak of the allocator's running total of live bytes during one step, counted
from its value at the start (activations, tensors saved for backward, gradients
(set to ``None`` first) and workspaces that go through PyTorch's allocator). On
CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation at the start.

``--device cuda`` runs everything unchanged on a GPU (times synchronise the
device; ``--threads`` then only sets the CPU's thread count) and writes
``speed_cuda.md`` naming the GPU. The CPU results file says when no GPU figure
exists yet.

Usage::

    python benchmarks/speed.py --write                     # every setting, ~60-90 min on 2 cores (compiled steps included)
    python benchmarks/speed.py --write --size 160          # the same at 160x160 (writes speed_160px.md)
    python benchmarks/speed.py --quick                     # smoke run: 1 thread, NCHW, batch 1, 2 rounds, no compile
    python benchmarks/speed.py --models resnet50 --threads 2 --formats nchw
    python benchmarks/speed.py --device cuda --write       # on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, interleaved, load_line, median, preamble  # noqa: E402

import mgic_transform as mt  # noqa: E402
from mgic_transform.nn import MGICBlock  # noqa: E402
from mgic_transform.report import count_flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {  # model -> (group_size, coarsest_width)
    "resnet50": (32, 64),
    "mobilenet_v3_large": (8, 16),
}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
COLUMNS = ("orig", "mgic", "ckpt", "peer")
HEADS = {"orig": "original", "mgic": "MGIC", "ckpt": "MGIC ckpt", "peer": "pruned peer"}


def has_rule() -> bool:
    """Whether this version of ``mgicify`` takes ``rule=`` (the paper / compact hierarchy rule)."""
    return "rule" in inspect.signature(mt.mgicify).parameters


# --------------------------------------------------------------------------- timing and memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)
        sync(x.device)
    return run


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        sync(x.device)
    run.opt = opt  # type: ignore[attr-defined]
    return run


def peak_allocated(fn: Callable[[], None], device: torch.device) -> int:
    """Largest number of bytes live in PyTorch's allocator during ``fn()``, counted from zero at its start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

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
    # The running total also counts tensors allocated before this session that are still alive (e.g. the previous
    # step's gradients): subtract the total as it stood before this session's first event.
    _, size, total = events[0]
    return max(t for _, _, t in events) - (total - size)


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# --------------------------------------------------------------------------- the pruned peer

def pruned_to_flops(model: nn.Module, example: torch.Tensor, flops_ratio: float, step: float = 0.015) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning until its MACs are at most ``flops_ratio`` of the original's.

    Uniform per-layer channel ratio (``MetaPruner``, L2 magnitude importance),
    raised by ``step`` (1.5% of the channels) per step, channels rounded to multiples of 8; the classifier's
    output is kept. Stops at the first step at or below the target.
    """
    import torch_pruning as tp

    peer = copy.deepcopy(model).eval()
    classifier = [m for m in peer.modules() if isinstance(m, nn.Linear)][-1:]
    base, _ = tp.utils.count_ops_and_params(peer, example)
    steps = int(0.9 / step)
    pruner = tp.pruner.MetaPruner(peer, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=step * steps, iterative_steps=steps, ignored_layers=classifier,
                                  round_to=8)
    for _ in range(steps):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(peer, example)
        if macs <= flops_ratio * base:
            break
    return peer


# --------------------------------------------------------------------------- one case = one model under one rule

@dataclass
class Case:
    model: str
    rule: str
    s_g: int
    s_c: int
    nets: dict[str, nn.Module]
    info: dict = field(default_factory=dict)


def build_case(name: str, rule: Optional[str], args: argparse.Namespace, orig: nn.Module) -> Case:
    s_g, s_c = CASES[name]
    example = torch.zeros(1, 3, 224, 224)
    kw = {"rule": rule} if rule is not None else {}
    t0 = time.perf_counter()
    gm = mt.mgicify(orig, example, group_size=s_g, coarsest_width=s_c, transitions=args.transitions, **kw)
    t_transform = time.perf_counter() - t0
    ckpt = copy.deepcopy(gm)
    for m in ckpt.modules():
        if isinstance(m, MGICBlock):
            m.checkpoint = True
    report = mt.compare(orig, gm, example)
    print(f"  pruning the peer to FLOPs x{report.flops_ratio:.3f} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    peer = pruned_to_flops(orig, example, report.flops_ratio, step=args.prune_step)
    t_prune = time.perf_counter() - t0
    peer_flops = count_flops(peer, (example,)).total
    peer_params = sum(p.numel() for p in peer.parameters())
    plan = gm.meta["mgic"]
    info = dict(blocks=f"{len(plan.rewritten)} / {len(plan.blocks)}", params=(report.params_before, report.params_after,
                peer_params), flops=(report.flops_before, report.flops_after, peer_flops), transform_s=t_transform,
                prune_s=t_prune)
    return Case(name, rule or "compact (mgicify has no rule= at this commit)", s_g, s_c,
                {"orig": orig, "mgic": gm, "ckpt": ckpt, "peer": peer}, info)


@dataclass
class Row:
    what: str
    values: dict[str, float]  # column -> value (a missing column prints "-")
    unit: str


def run_setting(case: Case, threads: int, fmt_name: str, args: argparse.Namespace) -> tuple[list[Row], str, str]:
    """Every row of one table; returns the rows and the load before / after."""
    torch.set_num_threads(threads)
    fmt = FORMATS[fmt_name]
    for m in case.nets.values():
        m.to(device=args.device, memory_format=fmt)
    before = load_line()
    rows: list[Row] = []

    def log(row: Row) -> None:
        print(f"    {row.what}: " + " / ".join(f"{k} {v:.1f}" for k, v in row.values.items()), file=sys.stderr, flush=True)
        rows.append(row)

    def inp(bs: int) -> torch.Tensor:
        return torch.randn(bs, 3, args.size, args.size, device=args.device).contiguous(memory_format=fmt)

    inference_rows(case, args, inp, log, fmt)
    training_rows(case, args, inp, log)
    if args.compile and fmt_name == "nchw" and case.rule == (args.rules[0] if has_rule() else case.rule):
        compiled_training_rows(case, args, inp, log)
    for m in case.nets.values():
        m.to(memory_format=torch.contiguous_format)
    return rows, before, load_line()


def inference_rows(case: Case, args: argparse.Namespace, inp: Callable[[int], torch.Tensor], log,
                   fmt: torch.memory_format) -> None:
    """Latency at every batch size, BN-folded latency and peak memory at the largest (the checkpointed net is MGIC here)."""
    infer = {k: m.eval() for k, m in case.nets.items() if k != "ckpt"}
    for bs in args.batch_sizes:
        x = inp(bs)
        t = interleaved({k: inference_fn(m, x) for k, m in infer.items()}, args.rounds, args.warmup)
        log(Row(f"inference latency, batch {bs}", {k: 1e3 * median(v) for k, v in t.items()}, "ms"))
    bs = args.batch_sizes[-1]
    if not args.no_fold:
        x = inp(bs)
        folded = {k: mt.fold_batchnorm(m).to(memory_format=fmt) for k, m in infer.items()}
        t = interleaved({k: inference_fn(m, x) for k, m in folded.items()}, args.rounds, args.warmup)
        log(Row(f"inference latency, batch {bs}, BN-folded", {k: 1e3 * median(v) for k, v in t.items()}, "ms"))
        del folded
    x = inp(bs)
    log(Row(f"peak memory, inference batch {bs}",
            {k: peak_allocated(inference_fn(m, x), args.device) / 2**20 for k, m in infer.items()}, "MiB"))


def training_rows(case: Case, args: argparse.Namespace, inp: Callable[[int], torch.Tensor], log) -> None:
    """The eager training step of every network (the checkpointed one too) and its peak memory."""
    for m in case.nets.values():
        m.train()
    bs = args.train_batch
    x, y = inp(bs), torch.randint(0, 1000, (bs,), device=args.device)
    fns = {k: train_fn(m, x, y) for k, m in case.nets.items()}
    t = interleaved(fns, args.train_rounds, args.warmup)
    log(Row(f"training step, batch {bs}", {k: 1e3 * median(v) for k, v in t.items()}, "ms"))
    mems = {}
    for k, fn in fns.items():
        fn.opt.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        mems[k] = peak_allocated(fn, args.device) / 2**20
    log(Row(f"peak memory, training step batch {bs}", mems, "MiB"))
    for fn in fns.values():  # momentum buffers and grads would otherwise stay allocated for the next setting
        fn.opt.zero_grad(set_to_none=True)  # type: ignore[attr-defined]


def compiled_training_rows(case: Case, args: argparse.Namespace, inp: Callable[[int], torch.Tensor], log) -> None:
    """The training step with every network (not the checkpointed one) under ``torch.compile``, and its compile time.

    A fresh compile per setting (``torch._dynamo.reset()``): inductor's CPU kernels are
    generated for the thread count they are compiled at. ``dynamic=False``: one shape.
    """
    torch._dynamo.reset()
    bs = args.train_batch
    x, y = inp(bs), torch.randint(0, 1000, (bs,), device=args.device)
    fns, compile_s = {}, {}
    for k, m in case.nets.items():
        if k == "ckpt":  # checkpoint's context_fn is not one dynamo supports
            continue
        fns[k] = train_fn(torch.compile(m.train(), dynamic=False, backend=args.compile_backend), x, y)
        t0 = time.perf_counter()
        fns[k]()  # the first step compiles forward and backward
        compile_s[k] = time.perf_counter() - t0
        print(f"    compiled the training step of {k} in {compile_s[k]:.0f} s", file=sys.stderr, flush=True)
    t = interleaved(fns, args.train_rounds, args.warmup)
    what = "torch.compile" + ("" if args.compile_backend == "inductor" else f" (backend {args.compile_backend})")
    log(Row(f"training step, batch {bs}, {what}", {k: 1e3 * median(v) for k, v in t.items()}, "ms"))
    log(Row(f"{what} of the training step (first step)", compile_s, "s"))
    for fn in fns.values():
        fn.opt.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
    torch._dynamo.reset()


# --------------------------------------------------------------------------- report

def _cell(v: Optional[float], unit: str) -> str:
    return "-" if v is None else f"{v:.1f} {unit}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def table(rows: list[Row]) -> list[str]:
    out = ["| measurement | original | MGIC | MGIC ckpt | pruned peer | MGIC / orig | ckpt / orig | MGIC / peer | peer / orig |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        v = r.values.get
        out.append(f"| {r.what} | " + " | ".join(_cell(v(k), r.unit) for k in COLUMNS) + " | "
                   + " | ".join((_ratio(v("mgic"), v("orig")), _ratio(v("ckpt"), v("orig")), _ratio(v("mgic"), v("peer")),
                                 _ratio(v("peer"), v("orig")))) + " |")
    return out


def targets(results: list[tuple[Case, int, str, list[Row], str, str]], cores: int) -> list[str]:
    """The eager targets, read off the tables: met or not, with the measured ratio (MGIC / original).

    ResNet-50 (paper rule, NCHW): inference at batch 8 <= 0.85x at 1 thread and <= 1.0x at
    2 threads; the training step <= 1.0x at 1 thread and <= 1.15x at 2. Checkpointing: training
    memory <= 1.0x, step time <= 1.3x.
    """
    out = ["| target | setting | measured | met |", "|---|---|--:|---|"]

    def add(goal: str, setting: str, value: Optional[float], limit: float) -> None:
        if value is not None:
            out.append(f"| {goal} | {setting} | {value:.2f} | {'yes' if value <= limit else '**no**'} |")

    for case, threads, fmt, rows, _, _ in results:
        setting = f"{case.model}, {case.rule.split(' ')[0]}, {threads} thr, {fmt}"
        by = {r.what: r.values for r in rows}
        main_case = case.model == "resnet50" and case.rule.startswith("paper") and fmt == "nchw" and threads <= 2
        for what, v in by.items():
            if main_case and what == "inference latency, batch 8":
                limit = 0.85 if threads == 1 else 1.0
                add(f"ResNet-50 inference, batch 8, <= {limit}x at {threads} thread(s)", setting, v["mgic"] / v["orig"], limit)
            if main_case and what.startswith("training step") and "compile" not in what:
                limit = 1.0 if threads == 1 else 1.15
                add(f"ResNet-50 training step <= {limit}x at {threads} thread(s)", setting, v["mgic"] / v["orig"], limit)
            if what.startswith("peak memory, training") and "ckpt" in v:
                add("checkpointed training memory <= 1.0x original", setting, v["ckpt"] / v["orig"], 1.0)
            if what.startswith("training step") and "ckpt" in v:
                add("checkpointed step time <= 1.3x original", setting, v["ckpt"] / v["orig"], 1.3)
    return out


def to_markdown(results: list, cases: list[Case], args: argparse.Namespace, started: str) -> str:
    dev = args.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    out = [
        *preamble(f"Speed and memory: original vs MGIC vs pruned peer ({'GPU ' + gpu if gpu else 'CPU'})", started),
        f"- load per table below (other jobs share the cores: compare ratios, which interleaving protects, more than "
        "absolute times)" + (f"; GPU: {gpu}, CUDA {torch.version.cuda}" if gpu else ""),
        f"- mgicify: transitions={args.transitions}; rule: "
        + ("as in each table" if has_rule() else "mgicify has no rule= argument at this commit: every table is today's "
           "grouping, the compact rule"),
        f"- input {args.size}x{args.size}; times are medians of {args.rounds} interleaved rounds for inference, "
        f"{args.train_rounds} for training, after {args.warmup} warm-up call(s); peak memory: allocator total counted "
        "from zero at the start of the step (see script docstring); torch.compile rows: NCHW only, `dynamic=False`, "
        "compiled afresh per table, first rule only",
    ]
    if gpu is None:
        out.append("- GPU: **no GPU figure exists yet** (this machine has none); `python benchmarks/speed.py "
                   "--device cuda --write` on a GPU machine writes `speed_cuda.md`")
    out += ["", "| model | rule | s_g / s_c | blocks rewritten | params orig -> MGIC / peer | FLOPs (fvcore) orig -> MGIC / "
            "peer | mgicify s | pruning s |", "|---|---|---|--:|--:|--:|--:|--:|"]
    for c in cases:
        (pb, pa, pp), (fb, fa, fp) = c.info["params"], c.info["flops"]
        out.append(f"| {c.model} | {c.rule.split(' ')[0]} | {c.s_g} / {c.s_c} | {c.info['blocks']} | {pb / 1e6:.2f}M -> "
                   f"{pa / 1e6:.2f}M (x{pa / pb:.3f}) / {pp / 1e6:.2f}M (x{pp / pb:.3f}) | {fb / 1e9:.3f}G -> {fa / 1e9:.3f}G "
                   f"(x{fa / fb:.3f}) / {fp / 1e9:.3f}G (x{fp / fb:.3f}) | {c.info['transform_s']:.1f} | "
                   f"{c.info['prune_s']:.1f} |")
    cores = os.cpu_count() or 1
    out += ["", "## Targets", "", *targets(results, cores)]
    for case, threads, fmt, rows, before, after in results:
        out += ["", f"## {case.model}, rule {case.rule.split(' ')[0]}, {threads} thread{'s' if threads > 1 else ''}, {fmt}",
                "", f"{before} before, {after} after", "", *table(rows)]
    return "\n".join(out) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--rules", nargs="+", default=["paper", "compact"],
                   help="hierarchy rules (ignored, with a note, where mgicify has no rule= yet)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help=f"intra-op thread counts (default 1 {cores})")
    p.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=None, help="default nchw channels_last")
    p.add_argument("--device", default="cpu", help="cpu or cuda (every row runs unchanged on the GPU)")
    p.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds for inference (default 6)")
    p.add_argument("--train-rounds", type=int, default=None, help="timed rounds for training (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="inference batch sizes (default 1 8)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch size (default 8)")
    p.add_argument("--prune-step", type=float, default=None,
                   help="channel fraction Torch-Pruning removes per step until the peer's FLOPs reach MGIC's "
                        "(default 0.015, --quick 0.05)")
    p.add_argument("--no-fold", action="store_true", help="skip the BN-folded inference row")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile training-step rows")
    p.add_argument("--compile", action="store_true", help="with --quick: time the compiled training step too")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled rows (default inductor; 'eager' only checks the plumbing)")
    p.add_argument("--transitions", action="store_true",
                   help="mgicify(transitions=True): also rewrite the width-changing blocks (the paper's MGIC-ResNet-50)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 thread, NCHW, one rule, 2 rounds, batch 1 inference, batch 2 training, no compile")
    p.add_argument("--write", action="store_true", help="also write benchmarks/results/speed[_transitions][_NNNpx][_cuda].md")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    args.compile = args.compile or not (args.quick or args.no_compile)
    args.prune_step = args.prune_step or (0.05 if args.quick else 0.015)
    args.threads = args.threads or ([1] if args.quick else sorted({1, cores}))
    args.formats = args.formats or (["nchw"] if args.quick else ["nchw", "channels_last"])
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.train_rounds = args.train_rounds or (1 if args.quick else 3)
    args.batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 8])
    args.train_batch = args.train_batch or (2 if args.quick else 8)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    rules: list[Optional[str]] = (args.rules[:1] if args.quick else args.rules) if has_rule() else [None]
    started = load_line()
    print(f"# {started}", file=sys.stderr)
    results, cases = [], []
    total = len(args.models) * len(rules) * len(args.formats) * len(args.threads)
    name = ("speed" + ("_transitions" if args.transitions else "") + ("" if args.size == 224 else f"_{args.size}px")
            + ("_cuda" if args.device.type == "cuda" else "") + ".md")
    path = RESULTS / name
    for model_name in args.models:
        torch.manual_seed(0)
        orig = torchvision.models.get_model(model_name, weights=None)
        for rule in rules:
            print(f"{model_name}, rule {rule} ...", file=sys.stderr, flush=True)
            cases.append(build_case(model_name, rule, args, orig))
    # Settings in order of what a run cut short should already have: every case at the first format and thread
    # count before any case at the next.
    for fmt in args.formats:
        for threads in args.threads:
            for case in cases:
                print(f"{case.model}, rule {case.rule}: {threads} thread(s), {fmt}", file=sys.stderr, flush=True)
                rows, before, after = run_setting(case, threads, fmt, args)
                results.append((case, threads, fmt, rows, before, after))
                if args.write:  # a long run that is cut short still leaves its finished tables
                    partial = f"- **partial run**: {len(results)} of {total} settings so far\n"
                    md = to_markdown(results, cases, args, started).replace("\n\n| model |", "\n" + partial + "\n| model |", 1)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(md)
    emit(to_markdown(results, cases, args, started), path if args.write else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
