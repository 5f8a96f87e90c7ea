"""The layers of DESIGN.md hold: imports run one way (kernels <- common <- services <- command line), no cycles.

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING:``. The graph is read from
each module's AST, so a lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "proto", "common", "services")
# The command line: the top layer. Nothing below it may import these.
CLI_MODULES = frozenset({"services.launch", "services.flags", "services.cluster"})
LAYER_OF_PACKAGE = {"kernels": 0, "proto": 0, "common": 1, "services": 2}
CLI_LAYER = 3


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an import statement anywhere in the module could refer to."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, path, node)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolves to the longest module prefix it names)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    targets.add(candidate)
                    break
        targets.discard(module)
        graph[module] = targets
    return graph


def layer(module: str) -> int:
    return CLI_LAYER if module in CLI_MODULES else LAYER_OF_PACKAGE[module.split(".")[0]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts if layer(dst) > layer(src))


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_run_one_way():
    assert upward_imports(import_graph()) == []


def test_the_checks_see_lazy_and_type_checking_imports(tmp_path):
    """The walker must catch what a plain `import` at the top would miss."""
    module = tmp_path / "probe.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from services import launch\n"
                      "def f():\n    from .sibling import thing\n")
    assert {"services.launch", "services", "x.sibling", "x.sibling.thing"} <= imported_names("x.probe", module)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward_imports({"kernels.x": {"common.y"}, "common.y": set()}) == ["kernels.x -> common.y"]
    assert upward_imports({"services.router.server": {"services.launch"}, "services.launch": set()}) == [
        "services.router.server -> services.launch"]


@pytest.mark.parametrize("modules", ["common.engine, kernels", "common.engine, common.transfer, common.coord"])
def test_lower_layers_load_nothing_from_services(modules):
    code = f"import sys, {modules}\nassert not [m for m in sys.modules if m.split('.')[0] == 'services'], 'services'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
