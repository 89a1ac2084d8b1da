"""The package's shape, drawn from its imports (docs/architecture.md): no import loops, the
runtime below the server, the exporter and the benchmarks, and imports at the top of a module
except where the target needs an optional extra."""

from __future__ import annotations

import ast
from pathlib import Path

import qasr

ROOT = Path(qasr.__file__).parent
# (module, imported module) pairs that may import inside a function: each target needs an extra
# (export: torch; serve: fastapi/uvicorn; bench: the export and test extras; precision: onnx).
LATE = {
    ("qasr.cli", "qasr.bench.official"), ("qasr.cli", "qasr.export.onnx_export"),
    ("qasr.cli", "qasr.export.quantize"), ("qasr.cli", "qasr.serve"), ("qasr.cli", "qasr.serve.ray"),
    ("qasr.cli", "qasr.serve.server"), ("qasr.cli", "qasr.serve.service"),
    ("qasr.runtime.resolve", "qasr.export.onnx_export"), ("qasr.runtime.resolve", "qasr.export.precision"),
    ("qasr.export.tensorrt_build", "qasr.export.precision"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, dict[str, bool]]:
    """module -> {imported qasr module: whether every import of it sits inside a function}."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, dict[str, bool]] = {}
    for name, path in modules.items():
        found = graph.setdefault(name, {})
        for node, late in _walk(ast.parse(path.read_text(encoding="utf-8")), False):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("qasr") and target != name and not _package_of(name, target):
                    found[target] = found.get(target, True) and late
    return graph


def _package_of(name: str, target: str) -> bool:
    """`from qasr.runtime.backends import x` also names the package qasr.runtime.backends itself."""
    return name.startswith(target + ".")


def _walk(node: ast.AST, late: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        inner = late or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, inner
        yield from _walk(child, inner)


def test_no_import_loops():
    graph = imports()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for target in graph.get(name, {}):
            assert seen.get(target) != 1, "import loop: " + " -> ".join(path[path.index(target):] + [target])
            if target not in seen:
                visit(target, path + [target])
        seen[name] = 2

    for name in graph:
        if name not in seen:
            visit(name, [name])


def test_imports_sit_at_the_top_but_for_optional_extras():
    late = {(name, target) for name, found in imports().items() for target, inner in found.items() if inner}
    assert late <= LATE, f"imported inside a function without needing an extra: {sorted(late - LATE)}"


def test_the_runtime_points_down():
    """The runtime reaches the checkpoint side only through resolve.py, and never the server or the benchmarks."""
    for name, found in imports().items():
        if name.startswith(("qasr.runtime", "qasr.kernels")):
            upward = {t for t in found if t.startswith(("qasr.serve", "qasr.bench", "qasr.cli", "qasr.export",
                                                        "qasr.models"))}
            assert not upward or name == "qasr.runtime.resolve", f"{name} imports {sorted(upward)}"
        if name.startswith("qasr.serve"):
            assert not any(t.startswith(("qasr.bench", "qasr.export")) for t in found), name


def test_each_backend_is_one_module_and_one_entry():
    from qasr.runtime.backends.select import BACKENDS, CHOICES

    assert CHOICES == ("auto", *BACKENDS)
    for name, module in BACKENDS.items():
        assert callable(module.usable) and callable(module.load), name
        assert module.__name__.startswith("qasr.runtime.backends."), name
