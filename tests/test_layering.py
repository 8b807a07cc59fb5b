"""The library's imports run one way: errors -> models / data -> quant / prune / fuse ->
checkpoint -> engine -> tasks -> pipeline. No cycles, and no imports hidden inside functions
to dodge one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# module prefix -> layer; a module may import its own layer or lower ones
LAYERS = {
    "compress": 0,  # the package itself (re-exports the error type)
    "compress.errors": 0,
    "compress.config": 0,
    "compress.cli": 0,
    "compress.report": 0,
    "compress.models": 1,
    "compress.data": 1,
    "compress.metrics": 1,
    "compress.detection": 1,  # its data, models and metric
    "compress.detection.task": 4,  # the engine's Task for detectors
    "compress.distributed": 1,
    "compress.quant": 2,
    "compress.distill": 2,
    "compress.prune": 2,
    "compress.fuse": 2,
    "compress.spec": 3,
    "compress.checkpoint": 3,
    "compress.pack": 3,
    "compress.deploy": 3,
    "compress.engine": 4,
    "compress.tasks": 5,
    "compress.pipeline": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> int:
    best = max(
        (p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None
    )
    if best is None:
        pytest.fail(f"{module} has no layer: add it to LAYERS in tests/test_layering.py")
    return LAYERS[best]


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(compress modules imported at module level, those imported inside functions)."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]
        found = {n for n in names if n.startswith("compress")}
        top |= found
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compress"):
                    inner.append(f"{fn.name}: {node.module}")
    return top, inner


MODULES = {module_name(p): p for p in sorted((ROOT / "compress").rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The module a dotted import name refers to (`compress.quant.quantize_` -> compress.quant)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    out = {}
    for mod, path in MODULES.items():
        deps = {resolve(n) for n in imports(path)[0]} - {None, mod}
        out[mod] = {d for d in deps if d is not None}
    return out


def test_no_imports_inside_functions():
    hidden = {mod: imports(p)[1] for mod, p in MODULES.items() if imports(p)[1]}
    assert not hidden, hidden


def test_imports_run_one_way():
    wrong = [
        f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
        for mod, deps in graph().items()
        for dep in deps
        if layer(dep) > layer(mod)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(g.get(mod, ())):
            if dep == mod or (mod.startswith(dep + ".") and MODULES[dep].name == "__init__.py"):
                continue  # a package's own __init__ re-exporting its modules
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack, mod, dep]))
            if dep not in state:
                visit(dep, [*stack, mod])
        state[mod] = 2

    for mod in g:
        if mod not in state:
            visit(mod, [])
