"""``mgic-transform``: rewrite a model into an MGIC network from the command line.

::

    mgic-transform model.py --group-size 32 --coarsest-width 64 --output-dir out/
    mgic-transform torchvision.models.resnet50 --input-shape 1,3,224,224

The command loads the model, runs :func:`mgic_transform.mgicify`, counts
parameters and FLOPs with :func:`mgic_transform.compare`, saves the rewritten
``GraphModule`` and the report, and prints the comparison table.

Exit status: ``0`` success; ``2`` a usage or input error (bad option, missing or
broken model file, no model found, unusable input shape, outputs already there);
``1`` a model that cannot be transformed (e.g. ``torch.fx`` cannot trace it).
Errors are one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import pickle
import sys
import textwrap
import threading
import time
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Optional, Sequence

from .errors import first_line

__all__ = ["main", "build_parser", "load_model", "parse_shape", "output_paths", "options_from_args", "load_calibration"]

EXIT_OK = 0
EXIT_UNTRANSFORMABLE = 1
EXIT_USAGE = 2

DEFAULT_OUTPUT_DIR = "mgic_out"
FACTORY_NAMES = ("build_model", "get_model", "create_model")
FORMATS = ("text", "markdown", "json")


class CLIError(Exception):
    """A user-facing failure: ``str(self)`` is the one line to print, ``code`` the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.3, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``"1x3x224x224"``) -> ``(1, 3, 224, 224)``; every size positive."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if not parts or any(not p.isdigit() or int(p) == 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"bad input shape {text!r}: give positive sizes separated by commas, e.g. 1,3,224,224"
        )
    return tuple(int(p) for p in parts)


_EPILOG = (
    "Finding the model in a file: --entry NAME (an nn.Module instance or a zero-argument "
    "callable); otherwise a module-level `model`, or a zero-argument "
    f"{'/'.join(FACTORY_NAMES)}(); otherwise the single nn.Module subclass defined in the "
    "file that builds without arguments. A dotted MODEL (torchvision.models.resnet50) is "
    "imported and called with no arguments; a dotted module name is searched like a file.",
    "Outputs in DIR: <name>_mgic.pt (torch.save of the GraphModule; reload with "
    "torch.load(path, weights_only=False)), <name>_mgic_report.json and <name>_mgic_report.md, "
    "where <name> is the file's stem or the last part of the dotted name. Existing outputs are "
    "kept unless --force. If the model keeps classes from MODEL's file (leaf modules), load the "
    ".pt from the file's directory so they can be imported.",
    "Exit status: 0 ok; 2 usage or input error; 1 the model cannot be transformed. "
    "Errors are one line on stderr; --debug adds the traceback.",
)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mgic-transform",
        description=textwrap.fill(
            "Rewrite a PyTorch CNN into a multigrid-in-channels (MGIC) network, save it, and print "
            "a parameter/FLOP comparison (fvcore: one multiply-add = one FLOP, as in the MGIC paper).",
            79,
        ),
        epilog="\n\n".join(textwrap.fill(paragraph, 79) for paragraph in _EPILOG),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the epilog's paragraphs
    )
    _model_arguments(p)
    _transform_arguments(p)
    _training_arguments(p)
    _output_arguments(p)
    return p


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a Python file (model.py) or a constructor such as torchvision.models.resnet50")
    p.add_argument("--entry", metavar="NAME",
                   help="name in MODEL of the nn.Module instance or zero-argument callable to use")
    p.add_argument("--input-shape", metavar="SHAPE", type=parse_shape, action="append",
                   help="example input shape, e.g. 1,3,224,224; repeat for a model with several inputs "
                        "(default: inferred from the first layer, e.g. Conv2d(3, ...) -> 1,3,224,224)")
    p.add_argument("--leaf-module", metavar="PATTERN", action="append", default=None,
                   help="keep a module whole (torch.fx does not trace into it): a class (pkg.mod.Class, or the "
                        "name of a class the model uses) or a module path glob (backbone.head.*); repeatable")


def _transform_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", metavar="N", type=_positive_int, default=None,
                   help="channels per group in the grouped fine levels, s_g (default: 32)")
    p.add_argument("--coarsest-width", metavar="N", type=_positive_int, default=None,
                   help="s_c, the width of the coarsest, fully coupled level (default: the group size). Under "
                        "--rule paper a block's levels halve its narrowest width m while half of it is still >= N; "
                        "the coarsest level is the first halving of m below N (a block with m < N is left alone). "
                        "Under --rule compact the outer width halves until it is <= N")
    p.add_argument("--skip", metavar="PATTERN", action="append", default=None,
                   help="leave blocks whose module path matches PATTERN alone; repeatable (--skip 'layer4.*' "
                        "--skip fc)")
    p.add_argument("--rule", choices=("paper", "compact"), default="paper",
                   help="hierarchy rule: 'paper' (levels follow each block's narrowest width, as the authors' "
                        "code; default) or 'compact' (outer width, much smaller networks)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-params", metavar="RATIO", type=_fraction, default=None,
                        help="choose the sizes for at most this fraction of the original's parameters, e.g. 0.3")
    budget.add_argument("--target-flops", metavar="RATIO", type=_fraction, default=None,
                        help="choose the sizes for at most this fraction of the original's multiply-adds, e.g. 0.5")
    p.add_argument("--transitions", action="store_true",
                   help="also rewrite width-changing blocks (depthwise 3x3 connector + MGIC block)")


def _training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", choices=("scratch", "inherit", "calibrate"), default=None,
                   help="'scratch' (default): fresh weights in every MGIC block; 'calibrate' (the default with "
                        "--calibrate): start from MODEL's trained weights and fit every block to MODEL's outputs "
                        "on the calibration data; 'inherit': the trained weights' Galerkin products alone, no data "
                        "(load the trained weights in MODEL's file, e.g. in build_model())")
    p.add_argument("--calibrate", metavar="FILE", default=None,
                   help="calibration data for a trained MODEL: a .pt file holding a tensor of inputs, or an "
                        "(inputs, targets) tuple (torch.save); at most 1,024 inputs are used")
    p.add_argument("--calibration-steps", metavar="N", type=int, default=None,
                   help="with --calibrate: optimizer steps per block (default: mgic_transform.calibrate's; fewer is "
                        "faster, 0 fits only BatchNorm statistics and the closed-form layers)")
    p.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing per MGIC block: less training memory, one more forward per step")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", action="store_true",
                   help="also write DIR/<name>_mgic.pt2: the network with BatchNorms folded, compiled ahead of time "
                        "(torch.export + AOTInductor, any batch size); load it with mgic_transform.load_pt2(path) "
                        "without recompiling. Compiling takes minutes for a large network")
    p.add_argument("--output-dir", metavar="DIR", default=DEFAULT_OUTPUT_DIR,
                   help=f"where to write the model and the report (default: ./{DEFAULT_OUTPUT_DIR}, created if missing)")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="how to print the comparison on stdout (default: text)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="status lines with timings on stderr (default: on; --no-progress silences them)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and all warnings")


# --------------------------------------------------------------------------- finding the model


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a namespace to search (file or module) or one object."""

    namespace: Optional[Mapping[str, Any]] = None
    obj: Any = None
    where: str = ""                            # for messages: "net.py", "torchvision.models"
    module_name: Optional[str] = None          # classes "defined here" have this __module__


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec or os.path.exists(spec)


def _module_name_for(path: Path) -> str:
    """The name the file is registered under in ``sys.modules``.

    The file's stem where that is free, so that classes defined in it pickle under
    a name a later process can import (from the file's directory).
    """
    stem = path.stem
    if stem.isidentifier() and stem not in sys.modules and importlib.util.find_spec(stem) is None:
        return stem
    return "_mgic_model_" + "".join(c if c.isalnum() else "_" for c in stem)


def _exec_file(path: Path) -> ModelSource:
    if not path.exists():
        raise CLIError(f"no such file: {path}; give a Python file that defines the model, or a name like torchvision.models.resnet50")
    if not path.is_file():
        raise CLIError(f"{path} is not a file; give a Python file that defines the model")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from exc
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise CLIError(f"{path}:{exc.lineno}: syntax error: {exc.msg}; fix the file and try again") from exc
    name = _module_name_for(path)
    module = types.ModuleType(name)
    module.__file__ = str(path.resolve())
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:  # a script part without `if __name__ == "__main__":`
        raise CLIError(f"{_where_in(exc, path)}{path} called sys.exit({exc.code!r}) while it was loaded; put the "
                       f"script part of the file under `if __name__ == \"__main__\":`") from exc
    except Exception as exc:  # noqa: BLE001 - user code: any failure is an input error
        raise CLIError(f"{_where_in(exc, path)}running {path} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    return ModelSource(namespace=vars(module), where=str(path), module_name=name)


def _where_in(exc: BaseException, path: Path) -> str:
    """``"net.py:12: "`` for the innermost traceback frame in ``path``, else ``""``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path.resolve()]
    return f"{path}:{frames[-1].lineno}: " if frames else ""


def _import_spec(spec: str) -> ModelSource:
    """``torchvision.models.resnet50`` -> that attribute; ``pkg.models`` -> that module to search."""
    module_part, _, attr = spec.partition(":")
    dotted = module_part.split(".")
    if not all(p.isidentifier() for p in dotted) or (attr and not attr.isidentifier()):
        raise CLIError(f"MODEL {spec!r} is neither an existing file nor a name like torchvision.models.resnet50")
    if not attr:
        module = _try_import(module_part)
        if module is not None:
            return ModelSource(namespace=vars(module), where=module_part, module_name=module.__name__)
        if len(dotted) == 1:
            raise CLIError(f"MODEL {spec!r} is neither an existing file nor an importable module; check the spelling")
        module_part, attr = ".".join(dotted[:-1]), dotted[-1]
    module = _try_import(module_part)
    if module is None:
        raise CLIError(f"cannot import {module_part!r} (from MODEL {spec!r}); is it installed in this environment?")
    if not hasattr(module, attr):
        raise CLIError(f"{module_part} has no attribute {attr!r}; check MODEL {spec!r}")
    return ModelSource(obj=getattr(module, attr), where=f"{module_part}.{attr}")


def _try_import(name: str) -> Optional[types.ModuleType]:
    """Import ``name``; ``None`` when it does not exist, an error when it exists but fails to import."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            return None
        raise CLIError(f"importing {name} failed: {first_line(exc)}") from exc
    except SystemExit as exc:
        raise CLIError(f"importing {name} called sys.exit({exc.code!r})") from exc
    except Exception as exc:  # noqa: BLE001 - third-party import code: any failure is an input error
        raise CLIError(f"importing {name} failed: {type(exc).__name__}: {first_line(exc)}") from exc


def _required_args(fn: Callable[..., Any]) -> Optional[list[str]]:
    """Names of the arguments ``fn()`` would miss; ``None`` when the signature is unknown."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return [
        n for n, p in sig.parameters.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _build(obj: Any, label: str) -> Any:
    """``obj`` if it is an ``nn.Module``, else ``obj()`` for a zero-argument callable."""
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CLIError(f"{label} is a {type(obj).__name__}, not an nn.Module or a zero-argument callable")
    missing = _required_args(obj)
    if missing:
        raise CLIError(
            f"{label} needs arguments ({', '.join(missing)}); point --entry at an nn.Module instance "
            "or a zero-argument function that builds the model"
        )
    try:
        model = obj()
    except SystemExit as exc:
        raise CLIError(f"building the model with {label}() called sys.exit({exc.code!r})") from exc
    except Exception as exc:  # noqa: BLE001 - user code: any failure is an input error
        raise CLIError(f"building the model with {label}() failed: {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CLIError(f"{label}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _find_in_namespace(src: ModelSource, entry: Optional[str]) -> Any:
    """Apply the search rules (see ``--help``) to a file's or module's namespace."""
    ns = src.namespace or {}
    if entry is not None:
        if entry not in ns:
            raise CLIError(f"{src.where} has no {entry!r} (--entry); candidates: {_candidates(src) or 'none'}")
        return _build(ns[entry], f"{src.where}:{entry}")
    if "model" in ns:
        return _build(ns["model"], f"{src.where}:model")
    for name in FACTORY_NAMES:
        if callable(ns.get(name)) and _required_args(ns[name]) == []:
            return _build(ns[name], f"{src.where}:{name}")
    classes = _module_classes(src)
    buildable = [c for c in classes if _required_args(c) == []]
    if len(buildable) == 1:
        return _build(buildable[0], f"{src.where}:{buildable[0].__name__}")
    why = "several nn.Module classes build without arguments" if buildable else "no model found"
    raise CLIError(
        f"{why} in {src.where} (saw: {_candidates(src) or 'nothing usable'}); pass --entry NAME, "
        f"or define `model = ...` or a zero-argument {FACTORY_NAMES[0]}()"
    )


def _module_classes(src: ModelSource) -> list[type]:
    from torch import nn

    return [
        v for v in (src.namespace or {}).values()
        if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == src.module_name
    ]


def _candidates(src: ModelSource) -> str:
    """A short list of what the search saw: classes with their required arguments, instances, factories."""
    from torch import nn

    classes = _module_classes(src)
    seen = []
    for name, v in (src.namespace or {}).items():
        if name.startswith("_"):
            continue
        if isinstance(v, nn.Module):
            seen.append(f"{name} (instance)")
        elif v in classes:
            req = _required_args(v)
            seen.append(f"class {name}" + (f"({', '.join(req)})" if req else "()"))
        elif inspect.isfunction(v) and getattr(v, "__module__", None) == src.module_name:
            req = _required_args(v)
            seen.append(f"{name}(" + ", ".join(req or []) + ")")
    return ", ".join(seen)


def load_model(spec: str, entry: Optional[str] = None) -> Any:
    """Resolve MODEL (a file or a dotted name) and ``--entry`` to an ``nn.Module``."""
    src = _exec_file(Path(spec)) if _is_file_spec(spec) else _import_spec(spec)
    if src.namespace is not None:
        return _find_in_namespace(src, entry)
    if entry is not None:
        raise CLIError(f"--entry applies to a file or a module; {spec!r} already names one object")
    return _build(src.obj, src.where)


def output_name(spec: str) -> str:
    """The ``<name>`` of the output files: the file's stem or the last part of a dotted name."""
    if _is_file_spec(spec):
        return Path(spec).stem
    return spec.replace(":", ".").rsplit(".", 1)[-1]


def output_paths(output_dir: Path, name: str, export: bool = False) -> dict[str, Path]:
    paths = {
        "model": output_dir / f"{name}_mgic.pt",
        "json": output_dir / f"{name}_mgic_report.json",
        "markdown": output_dir / f"{name}_mgic_report.md",
    }
    return {**paths, "pt2": output_dir / f"{name}_mgic.pt2"} if export else paths


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Progress:
    """Status lines with timings on stderr, for the steps that take a while on big models.

    A step's line appears once the step has run for ``after`` seconds (so quick steps, and
    the errors of quick steps, stay quiet: an error is still one line), and gets its time
    when the step ends.
    """

    enabled: bool
    after: float = 1.0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        lock, state = threading.Lock(), {"shown": False, "done": False}

        def show() -> None:
            with lock:
                if not state["done"]:
                    state["shown"] = True
                    print(f"{what}...", end="", file=sys.stderr, flush=True)

        def end(word: str) -> None:
            timer.cancel()
            with lock:
                state["done"] = True
                if state["shown"]:
                    print(f" {word}", file=sys.stderr, flush=True)

        timer = threading.Timer(self.after, show)
        timer.daemon = True
        start = time.perf_counter()
        timer.start()
        try:
            yield
        except BaseException:
            end("failed")
            raise
        end(f"{time.perf_counter() - start:.1f}s")


def _remove(files: Sequence[Path], folder: Optional[Path]) -> None:
    """Undo a failed save: the files written so far, and the output folder if this run created it."""
    for f in files:
        f.unlink(missing_ok=True)
    if folder is not None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _example_inputs(shapes: Optional[Sequence[tuple[int, ...]]]) -> Optional[tuple]:
    import torch

    if not shapes:
        return None
    try:
        return tuple(torch.randn(s) for s in shapes)
    except (RuntimeError, MemoryError) as exc:  # the allocator refuses a huge --input-shape
        shape = ",".join(map(str, max(shapes, key=lambda s: math.prod(s))))
        raise CLIError(f"cannot allocate an example input of shape {shape}: {first_line(exc)}; give a smaller "
                       f"--input-shape (only shapes matter; 1 is a fine batch size)") from exc


def _leaf_modules(specs: Sequence[str], model: Any) -> tuple:
    """``--leaf-module`` values: a class (``pkg.mod.Class``, or the name of a class the model uses) or a path glob."""
    import fnmatch

    types = {}
    for m in model.modules():
        cls = type(m)
        types.setdefault(cls.__name__, cls)
        types.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
    paths = [p for p, _ in model.named_modules() if p]
    out = []
    for spec in specs:
        if spec in types:
            out.append(types[spec])
            continue
        module_name, _, attr = spec.rpartition(".")
        cls = None
        if module_name and attr.isidentifier() and all(p.isidentifier() for p in module_name.split(".")):
            try:
                cls = getattr(importlib.import_module(module_name), attr, None)
            except Exception:  # noqa: BLE001 - not an importable module: read it as a path pattern
                cls = None
        from torch import nn

        if isinstance(cls, type) and issubclass(cls, nn.Module):
            out.append(cls)
        elif any(fnmatch.fnmatchcase(p, spec) for p in paths):
            out.append(spec)
        else:
            raise CLIError(f"--leaf-module {spec!r} names no class the model uses and matches no module path; "
                           f"give a class (pkg.mod.Class or its name) or a path pattern such as "
                           f"{(paths[0] + '.*') if paths else 'backbone.*'}")
    return tuple(out)


def options_from_args(args: argparse.Namespace, leaves: tuple = ()) -> Any:
    """The :class:`~mgic_transform.MGICOptions` the flags ask for (a bad combination is a usage error)."""
    from .errors import ConfigError
    from .options import MGICOptions

    init = args.init or ("calibrate" if args.calibrate else "scratch")
    try:
        return MGICOptions(group_size=args.group_size, coarsest_width=args.coarsest_width, skip=tuple(args.skip or ()),
                           transitions=True if args.transitions else None, rule=args.rule,
                           target_params=args.target_params, target_flops=args.target_flops, leaf_modules=leaves,
                           init=init, checkpoint=args.checkpoint, calibration_steps=args.calibration_steps)
    except ConfigError as exc:
        raise CLIError(first_line(exc)) from exc


def load_calibration(path: Optional[str]) -> Any:
    """``--calibrate FILE``: a tensor of inputs, or an ``(inputs, targets)`` tuple, saved with ``torch.save``."""
    import torch

    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--calibrate {path}: no such file; save the inputs with torch.save(inputs, {path!r})")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is an input error
        raise CLIError(f"--calibrate {path}: cannot load it with torch.load ({type(exc).__name__}: "
                       f"{first_line(exc)}); save a tensor of inputs or an (inputs, targets) tuple") from exc
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        data = data[0]
    if not isinstance(data, torch.Tensor) or data.dim() < 2:
        raise CLIError(f"--calibrate {path} holds a {type(data).__name__}, not a batch of inputs; save a tensor of "
                       f"shape (N, ...) or an (inputs, targets) tuple")
    return data


def _transform(model: Any, inputs: Optional[tuple], options: Any, calibration: Any = None) -> Any:
    """Run ``mgicify``; translate its errors into exit codes."""
    from . import mgicify
    from .errors import ConfigError, InputError, MGICError, TraceError

    try:
        return mgicify(model, inputs, options=options, calibration=calibration)
    except (ConfigError, InputError) as exc:
        raise CLIError(first_line(exc), EXIT_USAGE) from exc
    except MGICError as exc:
        cli = " (on the command line: --leaf-module PATTERN)" if isinstance(exc, TraceError) else ""
        raise CLIError(f"cannot transform the model: {first_line(exc)}{cli}", EXIT_UNTRANSFORMABLE) from exc
    except Exception as exc:  # noqa: BLE001 - find out whose fault it is before blaming the compiler
        if inputs is not None:
            _check_model_runs(model, inputs)
        raise CLIError(
            f"internal error in mgic-transform: {type(exc).__name__}: {first_line(exc)} "
            "(rerun with --debug for the traceback and please report it)",
            EXIT_UNTRANSFORMABLE,
        ) from exc


def _check_model_runs(model: Any, inputs: tuple) -> None:
    """Raise a usage error if the model itself rejects ``inputs`` (e.g. wrong channel count)."""
    import torch

    from .report import eval_mode

    shapes = ", ".join(",".join(map(str, t.shape)) for t in inputs)
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - user model: any failure means the shape is unusable
        raise CLIError(
            f"the model does not accept --input-shape {shapes}: {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _save(obj_writer: Callable[[Path], None], path: Path) -> None:
    """Write via a temporary file in the same directory, so a failure never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        obj_writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _run(args: argparse.Namespace, progress: _Progress) -> int:
    out_dir = Path(args.output_dir)
    paths = output_paths(out_dir, output_name(args.model), export=args.export)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not args.force:
        raise CLIError(f"{existing[0]} already exists; pass --force to overwrite it or choose another --output-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--output-dir {out_dir} exists and is not a directory")
    # stdout carries the report alone (--format json must parse): what the model's code prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        gm, report = _transform_and_compare(args, progress)
    _write_outputs(gm, report, out_dir, paths, progress)
    if args.export:
        _export(gm, paths["pt2"], progress)
    rendered = {"text": str, "markdown": lambda r: r.to_markdown(), "json": lambda r: r.to_json()}[args.format](report)
    print(rendered.rstrip("\n"))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return EXIT_OK


def _transform_and_compare(args: argparse.Namespace, progress: _Progress) -> tuple[Any, Any]:
    from .errors import MGICError
    from .report import compare

    with progress.step(f"loading {args.model}"):
        model = load_model(args.model, args.entry)
    inputs = _example_inputs(args.input_shape)
    options = options_from_args(args, _leaf_modules(args.leaf_module or (), model))
    calibration = load_calibration(args.calibrate)
    what = "searching sizes for the budget" if options.target else "tracing and rewriting"
    with progress.step(what + (", then calibrating" if calibration is not None else "")):
        gm = _transform(model, inputs, options, calibration)
    with progress.step("counting parameters and FLOPs"):
        try:
            report = compare(model, gm, inputs)
        except MGICError as exc:
            raise CLIError(first_line(exc)) from exc
    return gm, report


def _write_outputs(gm: Any, report: Any, out_dir: Path, paths: dict[str, Path], progress: _Progress) -> None:
    """The model and the report, each written whole or not at all (a failure removes what this run wrote)."""
    import torch

    created = not out_dir.exists()
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with progress.step(f"saving to {out_dir}"):
            for key, writer in (("model", lambda p: torch.save(gm, p)),
                                ("json", lambda p: p.write_text(report.to_json() + "\n")),
                                ("markdown", lambda p: p.write_text(report.to_markdown()))):
                _save(writer, paths[key])
                written.append(paths[key])
    except OSError as exc:
        _remove(written, out_dir if created else None)
        raise CLIError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    except (pickle.PicklingError, AttributeError, TypeError) as exc:  # an attribute pickle cannot save
        _remove(written, out_dir if created else None)
        raise CLIError(f"cannot save the transformed model: {type(exc).__name__}: {first_line(exc)}; the model "
                       f"holds an object pickle cannot save (a lambda, a local class or a hook)") from exc


def _export(gm: Any, path: Path, progress: _Progress) -> None:
    """``--export``: the ``.pt2`` beside the ``.pt`` (BatchNorms folded, AOTInductor, any batch size)."""
    from .deploy import export_pt2
    from .errors import MGICError
    from .plan import plan_of

    inputs = plan_of(gm).example_inputs
    with progress.step(f"compiling {path.name} ahead of time (AOTInductor)"):
        try:
            export_pt2(gm, inputs, path)
        except MGICError as exc:
            raise CLIError(f"cannot export the model: {first_line(exc)}", EXIT_UNTRANSFORMABLE) from exc
        except Exception as exc:  # noqa: BLE001 - export failures of torch: one line, not a traceback
            path.unlink(missing_ok=True)
            raise CLIError(f"cannot export the model: {type(exc).__name__}: {first_line(exc)} (the .pt and the "
                           f"report are written; rerun with --debug for the traceback)", EXIT_UNTRANSFORMABLE) from exc


def _show_warnings(caught: Sequence[warnings.WarningMessage], debug: bool) -> None:
    """Print our own warnings (and, with --debug, everyone's) one line each, without repeats."""
    package = str(Path(__file__).resolve().parent)
    seen = set()
    for w in caught:
        ours = str(w.filename).startswith(package) and issubclass(w.category, UserWarning)
        line = f"warning: {first_line(w.message)}" if not debug else warnings.formatwarning(
            w.message, w.category, w.filename, w.lineno).rstrip()
        if (ours or debug) and line not in seen:
            seen.add(line)
            print(line, file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mgic-transform`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    progress = _Progress(enabled=args.progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = _run(args, progress)
        except CLIError as exc:
            if args.debug:
                traceback.print_exc()
            print(f"mgic-transform: error: {exc}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            print("mgic-transform: interrupted", file=sys.stderr)
            return 130
    _show_warnings(caught, args.debug)
    return status


if __name__ == "__main__":
    sys.exit(main())
