"""The package layout (ARCHITECTURE.md "Packages"): ``pipelines`` and ``clipcap_core`` modules import each other
without cycles, so any module imports on its own and a reader follows imports downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Our modules ``path`` imports at module level (``if TYPE_CHECKING:`` blocks are not imports)."""
    out: set[str] = set()
    nodes = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nodes += list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [node]
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            parts = name.split(".")
            out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_pipelines_and_clipcap_core_have_no_import_cycle():
    files = [p for pkg in ("pipelines", "clipcap_core") for p in (ROOT / pkg).rglob("*.py")]
    known = {_module(p) for p in files}
    graph = {_module(p): _imports(p, known) - {_module(p)} for p in files}
    assert {m.split('.')[0] for m in graph} == {"pipelines", "clipcap_core"}  # a wrong root: no modules, no cycle
    assert len(graph) > 50
    assert _cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
