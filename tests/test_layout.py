"""The house's floors: every import of ``harness`` and ``methods`` runs downward (the
order of ``harness.FLOORS``), none closes a cycle, and no module of either grows past
the size a reader can hold (~400 lines). Imports inside functions count too: a lazy
import is still a dependency. Read with ``ast``, so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import harness

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 420      # "no file over ~400 lines"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in ("harness", "methods") for p in (ROOT / package).rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module an imported name lives in: ``harness.store.results`` for the name
    ``harness.store.results.write_atomic`` or the module itself; None outside the project."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from x import y`` counts ``x.y`` when
    ``y`` is a module, else ``x``)."""
    known = known or _modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = _resolve(target, known)
                if found is not None and found != name:
                    edges.add(found)
        graph[name] = edges
    return graph


def floor(module: str) -> int:
    """The index in ``harness.FLOORS`` of the floor a harness module stands on."""
    best = -1
    for i, prefix in enumerate(harness.FLOORS):
        if module == prefix or module.startswith(prefix + "."):
            best = i if prefix != "harness" or best < 0 else best
    assert best >= 0, f"{module} stands on no floor of harness.FLOORS"
    return best


def test_every_import_runs_downward():
    graph = import_graph()
    upward = []
    for source, targets in graph.items():
        for target in targets:
            if source.startswith("methods"):
                if not target.startswith("methods"):
                    upward.append(f"{source} -> {target} (methods import nothing of harness)")
            elif source.startswith("harness") and target.startswith("harness") and floor(target) > floor(source):
                upward.append(f"{source} -> {target}")
    assert not upward, "imports against the floors' order (harness.FLOORS):\n" + "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    """The two checks above on a graph that breaks them: they would notice."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor("harness.run.trial") > floor("harness.tasks.det.wrapper") > floor("harness.suite.spec")
    assert floor("harness.catalog") < floor("harness.store.results")
    known = {"harness.x": ROOT / "harness" / "__init__.py"}
    assert _resolve("harness.x.y.z", known) == "harness.x" and _resolve("numpy", known) is None


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_past_the_size_a_reader_holds(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by responsibility (at most ~400)"


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in (ROOT / "harness").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80, f"{init.relative_to(ROOT)}: a docstring saying what the package owns"
        if init.parent.name != "det":          # a sub-floor: its floor's rule holds
            assert "import" in doc, f"{init.relative_to(ROOT)}: say what it may import"
