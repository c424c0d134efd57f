"""The package's shape as docs/architecture.md states it: imports only go down the layers,
no module imports another of its own package in a cycle, and no import of fundusfm sits
inside a function (except in `cli/`, which imports its commands lazily so `--help` is fast,
and the package root's lazy `load_bundle`)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import fundusfm

ROOT = Path(fundusfm.__file__).parent

# docs/architecture.md's table, top to bottom; the package root (`__version__`) is base.
LAYERS = [
    ["cli", "__main__"],
    ["grid", "demo", "bench", "serve"],
    [
        "tasks",
        "explain",
        "screen",
        "legacy",
        "weights",
        "weights_import",
        "inference",
        "card",
        "card_metrics",
    ],
    ["engine"],
    ["models", "bundle"],
    ["evaluation"],
    ["data", "synthetic"],
    ["config", "io", "errors", "__init__"],
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
LAZY = {"cli", "__init__"}  # the two places allowed to import inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def unit(module: str) -> str:
    """The top folder or module of fundusfm a dotted name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()


def imports(path: Path) -> list[tuple[str, bool]]:
    """The fundusfm modules `path` imports, each with whether the import is inside a function."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "fundusfm":  # `from fundusfm import x`: x may be a module
                names = [
                    f"fundusfm.{a.name}" if _is_module(a.name) else "fundusfm" for a in node.names
                ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, id(node) not in top) for n in names if n.split(".")[0] == "fundusfm"]
    return found


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_belongs_to_a_layer():
    assert {unit(m) for m in MODULES} <= set(RANK), set(map(unit, MODULES)) - set(RANK)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down_and_never_hide_in_a_function(module: str):
    me = unit(module)
    for target, inner in imports(MODULES[module]):
        if me == "__init__" and inner:  # `fundusfm.load_bundle`: the public facade, lazy
            continue
        there = unit(target)
        assert RANK[there] >= RANK[me], f"{module} imports {target}, a layer above it"
        assert not inner or me in LAZY, f"{module} imports {target} inside a function"


def test_no_import_cycle_between_modules():
    graph = nx.DiGraph()
    for module, path in MODULES.items():
        for target, inner in imports(path):
            while target not in MODULES and "." in target:  # fundusfm.x.name -> fundusfm.x
                target = target.rsplit(".", 1)[0]
            if target != module and not inner:
                graph.add_edge(module, target)
    assert list(nx.simple_cycles(graph)) == []
