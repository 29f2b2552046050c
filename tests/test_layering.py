"""Layers only point down: core <- passes <- lowering <- façade, with the op kernels beside the core.

The test reads every module's imports (top level and inside functions) with `ast` and fails on an
import that points up a layer, naming the module, the line and the layer it may not reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"fxpress": "fxpress", "passes": "fxpress.passes", "lowering": "fxpress.lowering", "runtime": "fxpress.runtime"}

KERNEL_MODULES = {"ops", "quant", "hadamard", "hadamard_data", "hadamard_kernel", "embedding", "moe_quant", "threshold"}
FACADE_MODULES = {"fxpress", "fxpress.__main__", "fxpress.compiled", "fxpress.cli", "fxpress.recipe"}

# layer -> the layers its modules may import (its own layer included)
ALLOWED = {
    "errors": {"errors"},
    "kernels": {"errors", "kernels"},
    "core": {"errors", "core"},
    "passes": {"errors", "kernels", "core", "passes"},
    "lowering": {"errors", "kernels", "core", "lowering"},
    "runners": {"errors", "kernels", "core", "lowering", "runners"},
    "facade": {"errors", "kernels", "core", "passes", "lowering", "runners", "facade"},
}


def layer_of(module: str) -> str:
    """The layer of a dotted fxpress module name."""
    if module == "fxpress.errors":
        return "errors"
    if module in FACADE_MODULES:
        return "facade"
    if module.startswith("fxpress.passes"):
        return "passes"
    if module.startswith("fxpress.lowering"):
        return "lowering"
    if module.startswith("fxpress.runtime"):
        leaf = module.split(".")[2] if module.count(".") >= 2 else ""
        return "kernels" if leaf in KERNEL_MODULES or leaf == "" else "runners"
    return "core"


def module_files() -> dict[str, Path]:
    """Every fxpress module and its file, by dotted name."""
    modules: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every fxpress import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from fxpress import graph` imports the module fxpress.graph, not the package fxpress
            found += [(node.lineno, f"{base}.{a.name}" if base in {"fxpress", "fxpress.runtime", "fxpress.passes",
                                                                   "fxpress.lowering"} else base)
                      for a in node.names]
    return [(line, name) for line, name in found if name == "fxpress" or name.startswith("fxpress.")]


def upward_imports() -> list[str]:
    """Every import that points up a layer, as 'file:line: module (layer) imports target (layer)'."""
    problems = []
    for module, path in module_files().items():
        here = layer_of(module)
        for line, target in imported_modules(module, path):
            there = layer_of(target)
            if there not in ALLOWED[here]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {module} ({here}) imports {target} ({there})")
    return problems


def test_no_module_imports_a_layer_above_it():
    assert upward_imports() == []


@pytest.mark.parametrize("module, layer", [
    ("fxpress.program", "core"), ("fxpress.graph.editing", "core"), ("fxpress.passes.quantize.gptq", "passes"),
    ("fxpress.lowering.onnx", "lowering"), ("fxpress.runtime.quant", "kernels"), ("fxpress.runtime.runners", "runners"),
    ("fxpress.compiled", "facade"), ("fxpress.errors", "errors"),
])
def test_modules_fall_in_the_layer_the_design_names(module, layer):
    assert layer_of(module) == layer


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "program.py"
    bad.write_text("from fxpress.passes.base import Pass\nimport fxpress.lowering.onnx\n")
    targets = [layer_of(t) for _, t in imported_modules("fxpress.program", bad)]
    assert targets == ["passes", "lowering"]
    assert not ALLOWED["core"] & set(targets)
