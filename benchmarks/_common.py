"""Helpers shared by the benchmark scripts: machine description, fake-tensor checks, FLOP counting.

Nothing here is part of the package; the scripts import it as ``benchmarks._common``
when run from the repository root (``python benchmarks/zoo_coverage.py``) or as
``_common`` when run from inside ``benchmarks/``.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["machine_line", "load_line", "code_version", "fake_forward", "out_shapes", "count_params", "interleaved", "emit", "median",
           "fmt_ratio"]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line naming the machine: CPU model, cores torch uses, torch version."""
    return (f"{_cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}")


def code_version() -> str:
    """The commit of the repository, and whether ``mgic_transform/`` has uncommitted edits, *when the script started*.

    Read once, at import: a long run must name the code it imported, not a commit made while it ran.
    """
    return _CODE_VERSION


def _read_code_version() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mgic_transform"], cwd=root,
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown commit"
    return f"commit {head}" + (" + uncommitted edits in mgic_transform/" if dirty else "")


_CODE_VERSION = _read_code_version()


def load_line() -> str:
    """The 1/5/15-minute load averages (other people's jobs inflate timings; say so)."""
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f}"
    except OSError:
        return "load average unavailable"


def preamble(title: str, started: str) -> list[str]:
    """A results file's first lines: its title, then the machine, the code and the load at start and end."""
    return [f"# {title}", "", f"- machine: {machine_line()}", f"- code: {code_version()}",
            f"- load: {started} at start, {load_line()} at end"]


def fake_forward(run: Callable[..., Any], inputs: Sequence[torch.Tensor], *, count_flops: bool = True) -> tuple[Any, int | None]:
    """Run ``run(inputs)`` (which must build its own fake mode, e.g. ``run_fake``) and count FLOPs.

    Returns the (fake) output and the multiply-adds of conv / linear / matmul /
    attention ops as seen by :class:`torch.utils.flop_counter.FlopCounterMode`
    (which counts 2 FLOPs per multiply-add; we halve it to the paper's and
    fvcore's "1 multiply-add = 1 FLOP" convention). Norms, pooling and
    element-wise ops are not counted (fvcore counts norms and pooling, so fvcore
    ratios differ by about 1-2%; see benchmarks/README.md).
    """
    if not count_flops:
        return run(inputs), None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = run(inputs)
    return out, counter.get_total_flops() // 2


def fake_module_call(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """Call ``model(*inputs)`` on fake tensors in eval mode (no kernel runs); restore the mode after."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with mode, torch.no_grad():
            fake = [mode.from_tensor(t) for t in inputs]
            return model(*fake)
    finally:
        for m, t in flags:
            m.training = t


def out_shapes(out: Any) -> Any:
    """The output structure with every tensor replaced by its shape tuple."""
    return pytree.tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, out)


def count_params(model: nn.Module) -> int:
    """Scalar entries of ``model.parameters()`` (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Time every function ``rounds`` times, round-robin, alternating the order; ``warmup`` untimed calls first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def emit(md: str, path: Optional[Path]) -> None:
    """Print a benchmark's Markdown report; with ``path`` (``--write``) also save it there."""
    print(md)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)
        print(f"wrote {path}", file=sys.stderr)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def fmt_ratio(r: float | None, digits: int = 3) -> str:
    return "-" if r is None else f"{r:.{digits}f}"
