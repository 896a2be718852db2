"""The house rules of ARCHITECTURE.md, checked on the source: stages import only stages below them, no cycles, small
modules, and the CLI and benchmarks use only public names."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hyfx"

# Each stage may import only the stages in earlier rows (and itself); ARCHITECTURE.md explains the order.
STAGES: list[tuple[str, ...]] = [
    ("hyfx.errors", "hyfx.meta", "hyfx.ops", "hyfx.cpu", "hyfx.timing", "hyfx.registry", "hyfx.files",
     "hyfx.ray_workers"),
    ("hyfx.quant",),
    ("hyfx.data", "hyfx.evaluate"),
    ("hyfx.passes",),
    ("hyfx.capture", "hyfx.graph", "hyfx.report"),
    ("hyfx.hardware",),
    ("hyfx.search",),
    ("hyfx.mixed",),
    ("hyfx.recipes",),
    ("hyfx.refine",),
    ("hyfx.backends",),
    ("hyfx.checkpoint", "hyfx.hybrid", "hyfx.attention_probes", "hyfx.zoo", "hyfx.splits"),
    ("hyfx.pipelines",),
    ("hyfx",),
    ("hyfx.cli",),
]
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str) -> set[str]:
    """Every hyfx module `path` imports, at top level or inside functions (`from hyfx import x` names hyfx.x when
    x is a module, else hyfx)."""
    known = modules()
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("hyfx") and target != name:
                out.add(target)
    return out


def stage(name: str) -> int:
    best = None
    for rank, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{name} is in no stage of STAGES: add it to the row of its job"
    return best[0]


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, path in modules().items():
        graph.add_node(name)
        for target in imported(path, name):
            graph.add_edge(name, target)
    return graph


def backward_edges(graph: nx.DiGraph) -> list[tuple[str, str]]:
    """Imports from a module to one of a later stage (a package's own __init__ importing its modules is not one)."""
    return sorted((a, b) for a, b in graph.edges if stage(b) > stage(a) and not b.startswith(a + "."))


def test_every_module_is_in_a_stage():
    for name in modules():
        stage(name)


def test_no_import_runs_backwards_and_there_is_no_cycle():
    graph = import_graph()
    assert backward_edges(graph) == []
    assert list(nx.simple_cycles(graph)) == []


def test_backends_import_no_recipe_refiner_or_pipeline_and_quant_no_graph():
    graph = import_graph()
    for a, b in graph.edges:
        if a.startswith("hyfx.backends"):
            assert not b.startswith(("hyfx.recipes", "hyfx.refine", "hyfx.pipelines", "hyfx.mixed", "hyfx.search")), (a, b)
            assert b != "hyfx", (a, b)
        if a.startswith("hyfx.recipes"):
            assert not b.startswith(("hyfx.backends", "hyfx.refine", "hyfx.pipelines")) and b != "hyfx", (a, b)
        if a.startswith("hyfx.quant"):
            assert not b.startswith(("hyfx.graph", "hyfx.passes")), (a, b)


def test_recipes_folder_holds_only_methods():
    files = sorted(p.stem for p in (PACKAGE / "recipes").glob("*.py"))
    assert files == ["__init__", "easyquant", "efficientquant", "hyq", "hysquant", "minmax", "ptq4vit", "qhyvit",
                     "registry", "repqvit"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def _private_imports(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hyfx"):
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return bad


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")) + sorted((PACKAGE / "cli").glob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_cli_and_benchmarks_use_only_public_names(path):
    assert _private_imports(path) == []
