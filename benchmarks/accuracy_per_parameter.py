"""Accuracy per parameter and per FLOP: MGIC against the honest baselines (issue 11).

What it measures
    Test accuracy (mean ± std over seeds) of small CNNs trained from scratch with ONE shared
    recipe per task, against their parameter count and FLOPs, for these arms:

    * **thin**: the original architecture with every width scaled by a multiplier (a curve;
      multiplier 1 is the original);
    * **mgic**: ``mgicify(original, rule=..., group_size=s_g, coarsest_width=s_c)`` over
      several ``(s_g, s_c)``, once with the paper's initialisation of the new layers (R/P
      positive and row-stochastic, ``N_j.weight = 1``; the compiler's default until this study)
      and once with ``N_j.weight = 0`` and R/P under PyTorch's default conv init (the compiler's
      default since, on this study's evidence).
      The two other combinations are run at the middle ``(s_g, s_c)`` only (issue 11 item 4);
    * **pruned-init**: Torch-Pruning (DepGraph ``MetaPruner``, ``GroupMagnitudeImportance(p=2)``,
      uniform ratio, classifier ignored) applied to the freshly initialised original, with
      the ratio bisected to the parameter count of each MGIC point, then trained with the
      shared recipe;
    * **pruned-trained**: the same pruning applied to the original trained with the shared
      recipe (same seed), then fine-tuned for half the shared epochs at a tenth of its peak
      learning rate. This arm therefore gets 1.5x the training steps of the others.

    Tasks (all data generated or shipped locally; nothing is downloaded):

    * ``mnist1d``: MNIST-1D (``mnist1d.data.make_dataset(get_dataset_args())``), 1,200
      training / 600 validation sequences from its training split, its 1,000 test sequences
      (with 2,400 training sequences the original reached 99.2-99.3%: too close to saturation);
      a 1D ResNet (Conv1d stem, 3 residual blocks of width 64, Conv1d-BN-ReLU);
    * ``digits``: scikit-learn's 8x8 digits upsampled to 16x16, a fixed 25% test split (450), 300
      training / 300 validation images from the rest, +-1 px random shifts (with 500 training
      images the original reached 98.4-99.1%); the CIFAR
      ResNet-20 (widths 16/32/64) with projection ("B") shortcuts, because Torch-Pruning
      mis-prunes the zero-padding option-A shortcut (the pruned net fails to run).

    The recipe (SGD + Nesterov 0.9, one-cycle lr, weight decay 5e-4, batch 64, fixed epochs)
    was tuned once on the original's *validation* accuracy (``--tune``), never on test.
    Test accuracy is read once, at the end of training.

How to run
    python benchmarks/accuracy_per_parameter.py --write           # the full study (~1 h, 2 workers)
    python benchmarks/accuracy_per_parameter.py --tune --write    # the learning-rate check on validation
    python benchmarks/accuracy_per_parameter.py --quick --out /tmp/app   # smoke run (~1 min)

Every finished training run is cached in ``<out>/accuracy_per_parameter.json`` (keyed by task,
recipe, arm, configuration and seed) as soon as it ends, so an interrupted run resumes where it
stopped and more seeds can be added later. Trained originals that the pruned-trained arm starts
from are kept as ``.pt`` files next to it (git-ignored). ``--write`` renders
``accuracy_per_parameter.md`` and ``.png`` from the cache.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
from _common import code_version, load_line, preamble  # noqa: E402
from models import cifar_resnet  # noqa: E402

import mgic_transform as mt  # noqa: E402
from mgic_transform.nn.mgic_block import MGICBlock  # noqa: E402
from mgic_transform.nn.transfer import init_transfer_  # noqa: E402
from mgic_transform.report import count_flops, count_params  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RULE_SUPPORTED = "rule" in inspect.signature(mt.mgicify).parameters

# The initialisations of the layers mgicify adds (R_j, P_j, N_j), set explicitly after the
# transform so the arm means the same whatever the compiler's default is.
INITS = {
    "paper": ("rowstoch", 1.0),       # R/P positive, rows sum to 1; N_j.weight = 1
    "N0+conv": ("conv", 0.0),         # R/P nn.Conv default (Kaiming-uniform, a=sqrt(5)); N_j.weight = 0
    "N0": ("rowstoch", 0.0),
    "conv": ("conv", 1.0),
}


# ----------------------------------------------------------------------------- models
class Block1d(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`` with kernel-3 Conv1d."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class ResNet1d(nn.Module):
    """Conv1d(1, w, 5) + BN + ReLU, ``blocks`` residual blocks of width ``w``, mean over length, linear."""

    def __init__(self, width: int = 64, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[Block1d(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(-1))


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One dataset + architecture + the shared recipe, and the sweep run on it."""

    name: str
    epochs: int
    lr: float
    n_train: int
    n_val: int
    thin: tuple[float, ...]                  # width multipliers (1.0 = the original)
    # (s_g, s_c), the middle one of three also gets the init ablation. (4, 8) was first dropped to fit the
    # hour on a machine at load ~11 (an MGIC run took ~200 s there) and added in session 4 on a quiet one.
    mgic: tuple[tuple[int, int], ...]
    batch: int = 64
    weight_decay: float = 5e-4
    shift: int = 0                           # +-pixels of random shift (2D only)

    def recipe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("thin", "mgic")}

    def tag(self) -> str:
        return hashlib.sha1(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()[:8]

    def build(self, mult: float = 1.0) -> nn.Module:
        if self.name == "mnist1d":
            return ResNet1d(round(64 * mult))
        return cifar_resnet(20, in_channels=1, shortcut="B", widths=tuple(round(c * mult) for c in (16, 32, 64)))

    def example(self) -> torch.Tensor:
        return torch.randn(1, 1, 40) if self.name == "mnist1d" else torch.randn(1, 1, 16, 16)


TASKS = {
    "mnist1d": Task("mnist1d", epochs=20, lr=0.1, n_train=1200, n_val=600,
                    thin=(0.375, 0.5, 0.625, 0.75, 1.0), mgic=((16, 16), (8, 16), (4, 8))),
    "digits": Task("digits", epochs=20, lr=0.1, n_train=300, n_val=300, shift=1,
                   thin=(0.5, 0.625, 0.75, 1.0), mgic=((16, 16), (8, 16), (4, 8))),
}


def quick_task(task: Task) -> Task:
    """The smoke-test version: 1 epoch on 256 samples, one thin point, one MGIC point."""
    return Task(task.name, epochs=1, lr=task.lr, n_train=256, n_val=128, thin=(0.5, 1.0),
                mgic=(task.mgic[1],), batch=task.batch, weight_decay=task.weight_decay, shift=task.shift)


_DATA: dict[tuple, tuple] = {}


def load_data(task: Task):
    """``(x_train, y_train), (x_val, y_val), (x_test, y_test)`` for the task; fixed splits, cached per process."""
    key = (task.name, task.n_train, task.n_val)
    if key in _DATA:
        return _DATA[key]
    gen = torch.Generator().manual_seed(1234)  # the split does not depend on the training seed
    if task.name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # generated locally, deterministic (seed 42); never its URL
        x = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d["y"], dtype=torch.long)
        x_test = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
        y_test = torch.tensor(d["y_test"], dtype=torch.long)
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        xa = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        xa = F.interpolate(xa, size=(16, 16), mode="bilinear", align_corners=False)
        ya = torch.tensor(digits.target, dtype=torch.long)
        i_rest, i_test = train_test_split(torch.arange(len(ya)).numpy(), test_size=0.25,
                                          stratify=ya.numpy(), random_state=0)
        x, y, x_test, y_test = xa[i_rest], ya[i_rest], xa[i_test], ya[i_test]
    perm = torch.randperm(len(y), generator=gen)
    tr, va = perm[: task.n_train], perm[task.n_train: task.n_train + task.n_val]
    mean, std = x[tr].mean(), x[tr].std()
    norm = lambda t: (t - mean) / std  # noqa: E731
    out = ((norm(x[tr]), y[tr]), (norm(x[va]), y[va]), (norm(x_test), y_test), float(-mean / std))
    _DATA[key] = out
    return out


def random_shift(x: torch.Tensor, k: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by its own (dy, dx) in [-k, k], padding with ``fill`` (the blank-pixel value)."""
    if k == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (k,) * 4, value=fill)
    offs = torch.randint(0, 2 * k + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy: dy + h, dx: dx + w] for i, (dy, dx) in enumerate(offs)])


# ----------------------------------------------------------------------------- arms
def mgic_model(task: Task, seed: int, rule: str, sg: int, sc: int, init: str) -> nn.Module:
    torch.manual_seed(seed)
    kw = {"rule": rule} if RULE_SUPPORTED else {}
    gm = mt.mgicify(task.build(), (task.example(),), group_size=sg, coarsest_width=sc, **kw)
    set_init(gm, init)
    return gm


@torch.no_grad()
def set_init(model: nn.Module, init: str) -> None:
    """Re-initialise every MGIC block's R_j, P_j (``"rowstoch"`` / ``"conv"``) and N_j's weight."""
    transfer, n_weight = INITS[init]
    for m in model.modules():
        if not isinstance(m, MGICBlock):
            continue
        for op in (*m.restrict, *m.prolong):
            if transfer == "rowstoch":
                fan_in = op.weight.shape[1] if isinstance(op, nn.modules.conv._ConvNd) else op.weight.shape[-1]
                init_transfer_(op.weight, fan_in)
            else:
                op.reset_parameters()
        for n in m.norms:
            n.weight.fill_(n_weight)


def prune(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """Torch-Pruning, uniform ``ratio`` of every prunable layer's channels, the classifier kept."""
    import torch_pruning as tp

    if ratio <= 0:
        return model
    head = model.fc
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[head])
    pruner.step()
    return model


def ratio_for(task: Task, target: int) -> tuple[float, int]:
    """The uniform pruning ratio whose pruned original has the parameter count closest to ``target`` (bisection)."""
    lo, hi, best = 0.0, 0.95, (0.0, count_params(task.build()))
    ex = task.example().expand(2, *task.example().shape[1:]).contiguous()
    for _ in range(18):
        mid = (lo + hi) / 2
        n = count_params(prune(task.build(), ex, mid))
        if abs(n - target) < abs(best[1] - target):
            best = (mid, n)
        lo, hi = (mid, hi) if n > target else (lo, mid)
    return best


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return sum((model(x[i: i + 500]).argmax(1) == y[i: i + 500]).sum().item() for i in range(0, len(y), 500)) / len(y)


def train(model: nn.Module, task: Task, seed: int, epochs: int, lr: float, label: str) -> float:
    """The shared recipe: SGD + Nesterov, one-cycle lr peaking at ``lr``; returns seconds."""
    (xt, yt), _, _, fill = load_data(task)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=task.weight_decay)
    steps = math.ceil(len(yt) / task.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), task.batch):
            idx = perm[i: i + task.batch]
            xb = random_shift(xt[idx], task.shift, fill, gen) if task.shift else xt[idx]
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def trained_original(task: Task, seed: int, cache_dir: Path) -> nn.Module:
    """The original trained with the shared recipe; reuses the thin-1.0 run's weights when saved."""
    path = cache_dir / f"{task.name}_{task.tag()}_original_seed{seed}.pt"
    torch.manual_seed(seed)
    model = task.build()
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        train(model, task, seed, task.epochs, task.lr, "original")
        save_atomic(model, path)
    return model


def save_atomic(model: nn.Module, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a concurrent reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


@dataclass
class Job:
    """One training run: ``arm`` with its configuration ``cfg`` on ``task`` for ``seed``."""

    task: str
    arm: str
    cfg: dict
    seed: int
    quick: bool = False
    cache_dir: str = ""
    label: str = field(default="")

    def key(self, task: Task) -> str:
        return f"{self.task}|{task.tag()}|{self.arm}|{json.dumps(self.cfg, sort_keys=True)}|seed{self.seed}"


def get_task(name: str, quick: bool) -> Task:
    return quick_task(TASKS[name]) if quick else TASKS[name]


def run_job(job: Job) -> dict:
    """Build, train and score one point (runs in a worker process)."""
    torch.set_num_threads(1)
    task = get_task(job.task, job.quick)
    cache_dir = Path(job.cache_dir)
    ex = task.example()
    epochs, lr = task.epochs, task.lr
    if job.arm in ("thin", "tune"):
        torch.manual_seed(job.seed)
        model = task.build(job.cfg.get("mult", 1.0))
        lr = job.cfg.get("lr", lr)
    elif job.arm == "mgic":
        c = job.cfg
        model = mgic_model(task, job.seed, c["rule"], c["s_g"], c["s_c"], c["init"])
    elif job.arm == "pruned-init":
        torch.manual_seed(job.seed)
        model = prune(task.build(), ex.expand(2, *ex.shape[1:]).contiguous(), job.cfg["ratio"])
    elif job.arm == "pruned-trained":
        model = prune(trained_original(task, job.seed, cache_dir), ex.expand(2, *ex.shape[1:]).contiguous(),
                      job.cfg["ratio"])
        epochs, lr = max(1, task.epochs // 2), task.lr / 10
    else:
        raise ValueError(job.arm)
    seconds = train(model, task, job.seed, epochs, lr, job.arm)
    if job.arm == "thin" and job.cfg.get("mult") == 1.0:
        save_atomic(model, cache_dir / f"{task.name}_{task.tag()}_original_seed{job.seed}.pt")
    _, (xv, yv), (xs, ys), _ = load_data(task)
    return {"task": job.task, "arm": job.arm, "cfg": job.cfg, "seed": job.seed, "label": job.label,
            "params": count_params(model), "flops": count_flops(model, (ex,)).total,
            "val": accuracy(model, xv, yv), "test": accuracy(model, xs, ys), "train_s": round(seconds, 1),
            "epochs": epochs, "lr": lr, "load": os.getloadavg()[0]}


# ----------------------------------------------------------------------------- the sweep
def mgic_label(rule: str, sg: int, sc: int, init: str) -> str:
    return f"MGIC {rule} s_g={sg} s_c={sc} init={init}"


def same_network(task: Task, rule_a: str, rule_b: str, sg: int, sc: int) -> bool:
    """Whether two rules give the same network here: same module tree, parameter names and shapes."""
    a, b = (mgic_model(task, 0, r, sg, sc, "paper") for r in (rule_a, rule_b))
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    return repr(a) == repr(b) and shapes(a) == shapes(b) and a.code == b.code


def plan_jobs(args: argparse.Namespace, cache_dir: Path) -> list[Job]:
    """Every training run of the study, in the order they are run."""
    rules = [r for r in args.rules if RULE_SUPPORTED or r == "compact"]
    if len(rules) < len(args.rules):
        print(f"note: this mgicify has no rule= parameter; running rule(s) {rules} only (the compact rule)")
    phase1: list[Job] = []
    phase2: list[Job] = []
    late: list[Job] = []
    later: list[Job] = []
    common = {"quick": args.quick, "cache_dir": str(cache_dir)}
    for name in args.tasks:
        task = get_task(name, args.quick)
        if args.tune:
            for lr in args.tune_lrs:
                phase1 += [Job(name, "tune", {"lr": lr}, s, label=f"original lr={lr}", **common) for s in args.seeds]
            continue
        for m in sorted(task.thin, reverse=True):  # the original first: the pruned-trained arm needs it
            phase1 += [Job(name, "thin", {"mult": m}, s, label=f"thin x{m}", **common) for s in args.seeds]
        # The first rule (the compiler's default, "paper") is the main MGIC arm: its points set the pruning
        # targets and get the single-change init ablation; the other rule follows once everything else is done.
        targets: dict[int, str] = {}
        for r, rule in enumerate(rules):
            for i, (sg, sc) in enumerate(task.mgic):
                if r > 0 and same_network(task, rule, rules[0], sg, sc):
                    args.notes.append(f"{name}, s_g={sg}, s_c={sc}: rule={rule!r} builds the same network as "
                                      f"rule={rules[0]!r} (same modules and shapes), so it is trained once.")
                    continue
                ablate = r == 0 and i == len(task.mgic) // 2 and not args.quick
                for init in ["paper", "N0+conv"] + (["N0", "conv"] if ablate else []):
                    cfg = {"rule": rule, "s_g": sg, "s_c": sc, "init": init}
                    dest = phase1 if r == 0 and init in ("paper", "N0+conv") else late if r == 0 else later
                    dest.extend(Job(name, "mgic", cfg, s, label=mgic_label(rule, sg, sc, init), **common)
                                for s in args.seeds)
                if r == 0:
                    targets[count_params(mgic_model(task, 0, rule, sg, sc, "paper"))] = f"{rule} s_g={sg} s_c={sc}"
        for n, what in targets.items():
            ratio, got = ratio_for(task, n)
            print(f"{name}: pruning ratio {ratio:.4f} gives {got} parameters for the MGIC point {what} ({n})")
            for arm, js in (("pruned-init", phase1), ("pruned-trained", phase2)):
                cfg = {"ratio": round(ratio, 6), "target": n}
                js += [Job(name, arm, cfg, s, label=f"{arm} to {what}", **common) for s in args.seeds]
    # Seed by seed, so that an interrupted study has every point at fewer seeds rather than some points
    # at none; within a seed the slow MGIC runs first, pruned-trained last (its original, thin x1.0, is
    # done by then; if not, it trains the same original itself). Then the init ablation, then the second rule.
    rank = {"mgic": 0, "tune": 0, "thin": 1, "pruned-init": 2, "pruned-trained": 3}
    by_seed = lambda js: sorted(js, key=lambda j: (j.seed, rank[j.arm]))  # noqa: E731  (stable within)
    return by_seed(phase1 + phase2) + by_seed(late) + by_seed(later)


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_file = out / "accuracy_per_parameter.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    jobs = plan_jobs(args, out)
    todo = [j for j in jobs if j.key(get_task(j.task, j.quick)) not in cache]
    print(f"{len(jobs)} runs planned, {len(todo)} not cached yet; {args.workers} worker(s); {load_line()}", flush=True)
    todo_total, done = len(todo), 0
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    if todo:
        with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_job, j): j for j in todo}
            for fut in cf.as_completed(futures):
                job = futures[fut]
                res = fut.result()
                cache[job.key(get_task(job.task, job.quick))] = res
                tmp = cache_file.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
                tmp.replace(cache_file)  # atomic: a crash never leaves half a file
                done += 1
                el = time.perf_counter() - start
                print(f"[{done}/{todo_total} {el / 60:5.1f} min, eta {el / done * (todo_total - done) / 60:5.1f} min] "
                      f"{job.task} {job.label} seed {job.seed}: test {100 * res['test']:.2f}% val "
                      f"{100 * res['val']:.2f}% params {res['params']} ({res['train_s']} s)", flush=True)


# ----------------------------------------------------------------------------- report
@dataclass
class Point:
    """The seeds of one configuration, aggregated."""

    task: str
    arm: str
    label: str
    cfg: dict
    params: int
    flops: int
    test: list[float]
    val: list[float]
    train_s: list[float]

    def mean(self, what: str = "test") -> float:
        return 100 * statistics.mean(getattr(self, what))

    def std(self, what: str = "test") -> float:
        xs = getattr(self, what)
        return 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0

    def curve(self) -> str:
        """The plotted curve this point belongs to."""
        if self.arm == "mgic":
            return f"MGIC {self.cfg['rule']}, init {self.cfg['init']}"
        return {"thin": "thin (width multiplier)", "pruned-init": "pruned at init, trained",
                "pruned-trained": "pruned after training, fine-tuned", "tune": "tune"}[self.arm]


def points(cache: dict, tasks: list[str], quick: bool, seeds: list[int]) -> list[Point]:
    tags = {name: get_task(name, quick).tag() for name in tasks}
    groups: dict[tuple, list[dict]] = {}
    for key, r in cache.items():
        if r["task"] in tags and key.split("|")[1] == tags[r["task"]] and r["seed"] in seeds:
            groups.setdefault((r["task"], r["arm"], json.dumps(r["cfg"], sort_keys=True)), []).append(r)
    pts = []
    for (task, arm, _), rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        pts.append(Point(task, arm, rs[0]["label"], rs[0]["cfg"], rs[0]["params"], rs[0]["flops"],
                         [r["test"] for r in rs], [r["val"] for r in rs], [r["train_s"] for r in rs]))
    pts.sort(key=lambda p: (p.task, p.curve(), p.params))
    return pts


def fmt_n(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def thin_at(pts: list[Point], x: int, attr: str = "params") -> Optional[float]:
    """The thin curve's test accuracy at ``x`` parameters (or FLOPs), linear in log(x) between neighbours."""
    thin = sorted((p for p in pts if p.arm == "thin"), key=lambda p: getattr(p, attr))
    for a, b in zip(thin, thin[1:]):
        xa, xb = getattr(a, attr), getattr(b, attr)
        if xa <= x <= xb:
            t = (math.log(x) - math.log(xa)) / (math.log(xb) - math.log(xa))
            return a.mean() + t * (b.mean() - a.mean())
    return None


def table(pts: list[Point]) -> str:
    lines = ["| arm | configuration | params | FLOPs | val acc. | test acc. (mean ± std) | n | per seed (test) | train s/run |",
             "|---|---|--:|--:|--:|--:|--:|---|--:|"]
    for p in pts:
        lines.append(f"| {p.curve()} | {p.label} | {fmt_n(p.params)} | {fmt_n(p.flops)} | {p.mean('val'):.2f} "
                     f"| **{p.mean():.2f} ± {p.std():.2f}** | {len(p.test)} | {', '.join(f'{100 * a:.1f}' for a in p.test)} "
                     f"| {statistics.mean(p.train_s):.0f} |")
    return "\n".join(lines)


def pareto_lines(pts: list[Point]) -> list[str]:
    """For every MGIC point: the thin curve at its parameter count, and the baselines that dominate it."""
    out = ["| MGIC point | params | test acc. | thin at same params (interp.) | difference | thin at same FLOPs | "
           "difference | baseline points with <= params and >= mean test acc. |",
           "|---|--:|--:|--:|--:|--:|--:|---|"]
    base = [p for p in pts if p.arm in ("thin", "pruned-init", "pruned-trained")]
    f = lambda v, sign="": "-" if v is None else f"{v:{sign}.2f}"  # noqa: E731
    for p in (q for q in pts if q.arm == "mgic"):
        t, tf = thin_at(pts, p.params), thin_at(pts, p.flops, "flops")
        dom = [b for b in base if b.params <= p.params and b.mean() >= p.mean()]
        out.append(f"| {p.label} | {fmt_n(p.params)} | {p.mean():.2f} ± {p.std():.2f} | "
                   f"{f(t)} | {f(None if t is None else p.mean() - t, '+')} | "
                   f"{f(tf)} | {f(None if tf is None else p.mean() - tf, '+')} | "
                   f"{'; '.join(f'{b.label} ({fmt_n(b.params)}, {b.mean():.2f})' for b in dom) or 'none'} |")
    return out


def plot(pts: list[Point], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    styles = {"thin (width multiplier)": ("k", "o", "-"), "pruned at init, trained": ("tab:green", "s", "--"),
              "pruned after training, fine-tuned": ("tab:olive", "D", "--")}
    palette = iter(["tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:pink", "tab:cyan", "tab:brown", "tab:gray"])
    for row, task in enumerate(tasks):
        tp_ = [p for p in pts if p.task == task and p.arm != "tune"]
        curves: dict[str, list[Point]] = {}
        for p in tp_:
            curves.setdefault(p.curve(), []).append(p)
        for col, (attr, xlabel) in enumerate((("params", "parameters"), ("flops", "FLOPs (multiply-adds)"))):
            ax = axes[row][col]
            for name, cps in curves.items():
                if name not in styles:  # MGIC curves; a single point is the init ablation's
                    styles[name] = (next(palette, "grey"), "^" if len(cps) > 1 else "x", "-")
                color, marker, ls = styles[name]
                cps = sorted(cps, key=lambda p: getattr(p, attr))
                ax.errorbar([getattr(p, attr) for p in cps], [p.mean() for p in cps], yerr=[p.std() for p in cps],
                            color=color, marker=marker, ls=ls, capsize=3, label=name, alpha=1 if len(cps) > 1 else 0.7)
            orig = [p for p in tp_ if p.arm == "thin" and p.cfg.get("mult") == 1.0]
            if orig:
                ax.plot([getattr(orig[0], attr)], [orig[0].mean()], "k*", ms=14, label="original")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy [%]")
            ax.set_title(f"{task}: test accuracy vs {xlabel.split(' ')[0]}")
            ax.grid(alpha=0.3, which="both")
            if col == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace, wall: float, load_start: str) -> str:
    out = Path(args.out)
    cache = json.loads((out / "accuracy_per_parameter.json").read_text())
    allpts = points(cache, args.tasks, args.quick, args.seeds)
    pts = [p for p in allpts if (p.arm == "tune") == args.tune]
    cmd = "python benchmarks/accuracy_per_parameter.py " + " ".join(sys.argv[1:])
    title = f"Accuracy per parameter: MGIC vs thin and pruned baselines{' (tune)' if args.tune else ''}"
    lines = preamble(title, load_start) + [
        f"- command: `{cmd.strip()}`; mgicify rule= supported: {RULE_SUPPORTED}",
        f"- each run single-threaded, {args.workers} worker process(es); wall time of this invocation "
        f"{wall / 60:.1f} min (cached points are not re-run); seeds: {args.seeds}", ""]
    lines += ["## Recipe (shared by every arm)", ""]
    for name in args.tasks:
        t = get_task(name, args.quick)
        lines.append(f"* **{name}**: {json.dumps(t.recipe())}; SGD + Nesterov 0.9, one-cycle lr, cross-entropy; "
                     f"pruned-trained fine-tunes {max(1, t.epochs // 2)} epochs at peak lr {t.lr / 10:g}.")
    lines += ["", "See the module docstring of `benchmarks/accuracy_per_parameter.py` for data, models and arms.", ""]
    lines += [f"* {n}" for n in args.notes] + ([""] if args.notes else [])
    tune = [p for p in points(cache, args.tasks, args.quick, sorted({r["seed"] for r in cache.values()}))
            if p.arm == "tune"]
    if tune and not args.tune:
        lines += ["Learning-rate check of the original on the validation split (`--tune`; the shared lr is the "
                  "one in the recipe above):", ""]
        lines += [f"{name}:\n\n{table([p for p in tune if p.task == name])}\n" for name in args.tasks]
    for name in args.tasks:
        tp_ = [p for p in pts if p.task == name]
        if not tp_:
            continue
        lines += [f"## {name}", "", table(tp_), ""]
        if not args.tune:
            lines += ["MGIC points against the baselines (test accuracy, mean over seeds):", "",
                      *pareto_lines(tp_), ""]
    if not args.tune and pts:
        png = out / "accuracy_per_parameter.png"
        plot(pts, [t for t in args.tasks if any(p.task == t for p in pts)], png)
        lines += [f"![accuracy per parameter]({png.name})", ""]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["mnist1d", "digits"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rules", nargs="+", choices=("paper", "compact"), default=["paper", "compact"])
    p.add_argument("--workers", type=int, default=2, help="worker processes, one thread each")
    p.add_argument("--out", default=str(RESULTS), help="directory of the cache, the .md and the .png")
    p.add_argument("--tune", action="store_true", help="only the original at --tune-lrs (validation accuracy decides)")
    p.add_argument("--tune-lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, 256 samples, one point per arm")
    p.add_argument("--report-only", action="store_true", help="train nothing: render what the cache holds")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--write", action="store_true", help="write accuracy_per_parameter.md (and .png) into --out")
    args = p.parse_args(argv)
    args.notes = list(args.note)
    if args.quick:
        args.seeds = args.seeds[:1]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    load_start, wall, args.version = load_line(), time.perf_counter(), code_version()
    if not args.report_only:
        run_all(args)
    md = report(args, time.perf_counter() - wall, load_start)
    print(md)
    if args.write:
        name = "accuracy_per_parameter_tune.md" if args.tune else "accuracy_per_parameter.md"
        (Path(args.out) / name).write_text(md)
        print(f"wrote {Path(args.out) / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
