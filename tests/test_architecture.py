"""The package's layers, written down once, and checked on every import (import-linter's contracts, by hand).

From the bottom up; a module may import from its own layer or any layer below,
never from a layer above, and no import cycle exists, type-only and function-level
imports included. A new module must be added here, in its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "mgic_transform"

LAYERS: list[set[str]] = [
    {"nn", "nn.mgic_block", "nn.transfer", "nn.checkpointing"},                  # runtime: what a saved model needs
    {"errors", "hierarchy", "options", "plan", "_modcopy"},                       # vocabulary: sizes, options, plan
    {"layers", "ops", "inputs"},                                                  # knowledge: layers and ops
    {"tracing"},                                                                  # torch.fx, with user-facing errors
    {"passes", "passes.shapes", "passes.channels", "passes.blocks", "passes.variants", "passes.transition",
     "passes.rewrite", "passes.inherit", "passes.ownership", "passes.calibrate"},  # one pass per file
    {"counting", "report", "budget", "inference", "deploy"},                      # measuring, searching, deploying
    {"api", "cli", ""},                                                           # the entry points
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imports_of(source: str, name: str, *, is_package: bool = False) -> set[str]:
    """Package modules a module imports, wherever the import statement is (top level, function, TYPE_CHECKING)."""
    here = name.split(".") if name else []
    package = here if is_package else here[:-1]  # what a relative import starts from
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("mgic_transform"):
                target = node.module.removeprefix("mgic_transform").lstrip(".")
            else:
                continue
            submodules = {f"{target}.{a.name}".lstrip(".") for a in node.names} & _ALL
            found |= submodules or {target}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("mgic_transform").lstrip(".") for a in node.names
                      if a.name.startswith("mgic_transform")}
    return found & _ALL


def _layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise KeyError(module)


_ALL = set().union(*LAYERS)


def _known(module: str) -> bool:
    return module in _ALL


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        g.add_node(name)
        for target in _imports(path):
            if target != name:
                g.add_edge(name, target)
    return g


def test_every_module_has_a_layer():
    missing = [_module_name(p) for p in PACKAGE.rglob("*.py") if not _known(_module_name(p))]
    assert missing == [], f"add these modules to LAYERS in {__file__}: {missing}"


def test_no_import_goes_up_a_layer():
    upward = [(a, b) for a, b in _graph().edges if _layer_of(b) > _layer_of(a)]
    assert upward == [], f"imports that go up a layer: {upward}"


def test_no_import_cycle():
    cycles = [c for c in nx.simple_cycles(_graph()) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"


def test_the_check_sees_function_level_and_type_only_imports():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..api import mgicify\n"
              "def f():\n    from ..report import compare\n    from . import shapes\n")
    assert _imports_of(source, "passes.rewrite") == {"api", "report", "passes.shapes"}
    assert _imports_of("from .plan import MGICPlan\nfrom .nn import transfer\n", "", is_package=True) == \
        {"plan", "nn.transfer"}


MAX_BODY_LINES = 60


def _long_functions(source: str, limit: int = MAX_BODY_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function whose body (docstring included) is longer than ``limit`` lines."""
    return [(node.name, node.body[-1].end_lineno - node.body[0].lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body[-1].end_lineno - node.body[0].lineno + 1 > limit]


def test_no_function_body_is_over_60_lines():
    long = {f"{path.relative_to(PACKAGE)}:{name}": n for path in sorted(PACKAGE.rglob("*.py"))
            for name, n in _long_functions(path.read_text())}
    assert not long, f"split these functions (body lines, docstring included): {long}"


def test_the_length_check_counts_a_long_body():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert _long_functions(f"def f():\n{body}\n") == [("f", 61)]
    assert _long_functions(f"def f():\n{body}\n", limit=61) == []
