"""The package layout stays what docs/architecture.md says: no import cycles, a small root."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "nanogrid_celery"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top_level_imports(path: Path) -> set[str]:
    """Imports that run when the module is imported (not under TYPE_CHECKING, not in defs)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else []:
            if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                break
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                if sub.module.startswith("nanogrid_celery"):
                    found.add(sub.module)
                    for alias in sub.names:  # "from pkg import module"
                        found.add(f"{sub.module}.{alias.name}")
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.startswith("nanogrid_celery"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py") if "guest" not in p.parts}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _top_level_imports(path) if m in modules and m != name}
    return graph


def test_no_import_cycles_inside_the_package():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep in stack:
                if state.get(dep) == 1:
                    cycles.append([*stack[stack.index(dep) :], dep])
                continue
            if state.get(dep) != 2:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node, [node])
    # a package importing its own submodule is not a cycle of concern (it is how packages load)
    real = [c for c in cycles if not all(m.startswith(c[0] + ".") for m in c[1:-1])]
    assert real == [], "import cycles: " + "; ".join(" -> ".join(c) for c in real)


def test_few_modules_at_the_package_root():
    root = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root) <= 8, root
