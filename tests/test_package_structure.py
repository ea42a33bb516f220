"""The package's import structure: no import cycle between its modules (imports inside functions included),
library code never imports the test builders (`testing/`), every module imports."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import mllm_efficiency

ROOT = Path(mllm_efficiency.__file__).parent
PKG = "mllm_efficiency"
# modules that need optional packages absent from a plain install are imported only where those exist
OPTIONAL = {"mllm_efficiency.eval.plugin": "lmms_eval", "mllm_efficiency.eval.tasks": "lmms_eval"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (the most specific module named:
    `from . import x` is an edge to the submodule x; parents' __init__ run on import are not edges)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = base[:len(base) - node.level + 1]
                    target = ".".join(parent + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    edges.add(sub if sub in mods else target)
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    g = _graph()
    assert "mllm_efficiency.core.attention_rows" in g["mllm_efficiency.pruning.fastv"]
    assert "mllm_efficiency.zoo" in g["mllm_efficiency.bench.harness"]  # imported inside load_model
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_library_code_does_not_import_testing():
    offenders = {m: sorted(e for e in edges if e.startswith(f"{PKG}.testing"))
                 for m, edges in _graph().items() if not m.startswith(f"{PKG}.testing")}
    assert {m: e for m, e in offenders.items() if e} == {}


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_imports(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    importlib.import_module(name)


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the test command the README gives (which lists the 15 slowest tests)."""
    repo = Path(__file__).resolve().parents[1]
    readme, ci = repo / "README.md", repo / ".ci" / "run"
    if not (readme.exists() and ci.exists()):
        pytest.skip("not a source checkout")
    command = "python -m pytest -q --durations=15"
    assert f"\n{command}\n" in readme.read_text()
    assert f"\n{command}\n" in ci.read_text()
