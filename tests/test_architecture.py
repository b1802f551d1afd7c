"""The shape of the code: layers without import cycles, short functions, reasons cited inside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "unimedvl_core"
MAX_FUNCTION_LINES = 60
# Folders in layer order: a module may import its own folder and the folders before it, never one after.
LAYERS = ["modeling", "io", "inference", "training", "tasks", "data", "surfaces"]


def _module_name(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


MODULES = {_module_name(p)[0]: p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module of the package this file imports, at the top or inside functions (lazy imports count)."""
    name, is_package = _module_name(path)
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join([*base[: len(base) - node.level + 1], *([module] if module else [])])
            targets = [module, *(f"{module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name and MODULES[t].name != "__init__.py"}
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return path
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_import_cycles():
    cycles = {tuple(sorted(c)) for m in GRAPH if (c := _cycle_from(m))}
    assert not cycles, f"import cycles: {sorted(cycles)}"


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def test_layers_import_only_downwards():
    upward = [(m, t) for m, targets in GRAPH.items() for t in targets
              if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert not upward, f"imports of a higher layer: {upward}"


def test_modeling_is_self_contained():
    outside = {(m, t) for m, targets in GRAPH.items() if m.startswith("unimedvl_core.modeling")
               for t in targets if not t.startswith("unimedvl_core.modeling")}
    assert not outside


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


def test_reasons_are_cited_inside_the_repository():
    outside = re.compile(r"\bspec(?: section)? \d+\.\d+|LIBRARY_FACTS|UNIMEDVL_SPEC")
    docs = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
    problems = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        if path == Path(__file__):
            continue
        text = path.read_text()
        problems += [f"{path.name}: cites {m.group(0)!r}" for m in outside.finditer(text)]
        for m in docs.finditer(text):
            target = REPO / "docs" / m.group(1)
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)} if target.exists() \
                else set()
            anchors |= set(re.findall(r'<a name="([\w-]+)">', target.read_text())) if target.exists() else set()
            if not target.exists() or (m.group(2) and m.group(2) not in anchors):
                problems.append(f"{path.name}: {m.group(0)} does not exist")
    assert not problems, "\n".join(problems)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
