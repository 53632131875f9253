"""The house's shape, checked from the source: imports run one way between wings, no file imports itself back
through others, and no source file outgrows 500 lines.

Wings, lowest first (a module may import its own wing and the wings below it, never one above):
errors < runtime < moe (the library) < placement < models, data (side by side, neither imports the other)
< checkpoint < profiling.runtime < training < entry points (moe_dist/train.py, export_hf.py, cli.py, ...)
< profiling.analysis < profiling.bench. profiling.runtime imports only the library (and errors).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

SOURCES = ("moe_dist", "profiling", "launch")
MAX_LINES = 500

RANK = {
    "moe_dist.errors": 0,
    "moe_dist.runtime": 1,
    "moe_dist.moe": 2,
    "moe_dist.placement": 3,
    "moe_dist.models": 4,
    "moe_dist.data": 4,
    "moe_dist.checkpoint": 5,
    "profiling.runtime": 6,
    "moe_dist.training": 7,
    "entry": 8,
    "launch": 8,
    "profiling.analysis": 9,
    "profiling.bench": 10,
}
SIDE_BY_SIDE = {frozenset({"moe_dist.models", "moe_dist.data"})}
ONLY = {"profiling.runtime": {"moe_dist.errors", "moe_dist.moe", "profiling.runtime"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def wing(module: str) -> str:
    for name in sorted(RANK, key=len, reverse=True):
        if name == "entry":
            continue
        if module == name or module.startswith(name + "."):
            return name
    if module == "moe_dist":
        return "moe_dist.moe"  # the package's __init__ re-exports the library's names
    if module == "profiling":
        return "entry"
    if module.startswith("moe_dist."):
        return "entry"  # a module directly in moe_dist/: an entry point (train, export_hf, cli, ...)
    raise AssertionError(f"{module} belongs to no wing")


def source_files() -> list[Path]:
    return sorted(p for top in SOURCES for p in (ROOT / top).rglob("*.py"))


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules that ``path`` imports (at any depth: a function-level import counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in source_files()}
    modules = set(files)
    # importing a.b.c imports the packages a and a.b first; those edges are not the importer's choice
    graph = {}
    for m, p in files.items():
        graph[m] = {d for d in imports(p, modules) if not m.startswith(d + ".") and d != m}
    return graph


def test_imports_run_one_way_between_wings() -> None:
    wrong = []
    for mod, deps in import_graph().items():
        here = wing(mod)
        for dep in deps:
            there = wing(dep)
            if there == here:
                continue
            if here in ONLY and there not in ONLY[here]:
                wrong.append(f"{mod} -> {dep} ({here} imports only the library)")
            elif RANK[there] > RANK[here] or frozenset({here, there}) in SIDE_BY_SIDE:
                wrong.append(f"{mod} -> {dep} ({here} may not import {there})")
            elif RANK[there] == RANK[here]:
                wrong.append(f"{mod} -> {dep} ({here} and {there} are side by side)")
    assert not wrong, "imports against the wings' direction:\n" + "\n".join(sorted(wrong))


def test_no_import_circle() -> None:
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_source_file_over_500_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in source_files()}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines: {long}"


def test_layout_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: an import from the library up into training is reported."""
    fake = tmp_path / "m.py"
    fake.write_text("from moe_dist.training.trainer import Trainer\nimport moe_dist.moe.layer\n")
    found = imports(fake, {"moe_dist.training.trainer", "moe_dist.moe.layer", "moe_dist.moe"})
    assert found == {"moe_dist.training.trainer", "moe_dist.moe.layer"}
    assert RANK[wing("moe_dist.training.trainer")] > RANK[wing("moe_dist.moe.layer")]
