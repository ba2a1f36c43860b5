"""The package layering, read from the source with `ast` (nothing is imported).

Layers, lowest first: cli < data < model < infer < train. A module imports only its own package or
lower ones, so e.g. inference never pulls in training code and the Kaggle wheel stays small.
bench/ sits on top and may import anything; nothing in the product imports it, and it is not
shipped. Every import counts: `import x.y`, `from x.y import z`, relative imports, and imports
inside functions (they run the moment the function does).
"""
from __future__ import annotations

import ast
import zipfile
from pathlib import Path

from conftest import REPO

LAYERS = ("cli", "data", "model", "infer", "train")
BENCH = "bench"
# Top-level names that belong to this repo; imports of anything else (torch, pandas, ...) are not ours.
OURS = (*LAYERS, BENCH, "tests")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repo_modules() -> dict[str, Path]:
    """Dotted module name -> source file for every module of the product and bench/."""
    return {module_name(p): p for pkg in (*LAYERS, BENCH) for p in sorted((REPO / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def imported_names(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """Every dotted name `module` imports, anywhere in its source, relative imports resolved.

    `from a.b import c` counts as importing a.b.c where that is one of `modules`, else a.b.
    """
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(filter(None, [*anchor, base]))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def imports_by_module() -> dict[str, tuple[Path, set[str]]]:
    """Module -> (file, the repo names it imports)."""
    sources = repo_modules()
    out = {}
    for module, path in sources.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py", set(sources))
        out[module] = path, {n for n in names if n.split(".")[0] in OURS}
    return out


def test_the_import_reader_sees_every_kind_of_import():
    source = (
        "import data.io\n"
        "from model.run import verify_run\n"
        "def late():\n"
        "    from train import fold\n"
        "from . import sibling\n"
        "from ..scoring import plan_batches\n"
    )
    modules = {"data.io", "model.run", "train.fold", "infer.sub.sibling", "infer.scoring"}
    names = imported_names(ast.parse(source), "infer.sub.mod", is_package=False, modules=modules)
    assert names == modules


def test_each_module_imports_only_its_own_layer_or_lower():
    offending = []
    modules = imports_by_module()
    for module, (path, names) in sorted(modules.items()):
        own = module.split(".")[0]
        if own == BENCH:
            continue
        for name in sorted(names):
            top = name.split(".")[0]
            if top not in LAYERS or LAYERS.index(top) > LAYERS.index(own):
                offending.append((str(path.relative_to(REPO)), name))
    assert not offending, "imports against the layer order cli < data < model < infer < train (or of bench/tests):\n" + \
        "\n".join(f"  {file}: {name}" for file, name in offending)
    assert "model.run" in modules["train.fold"][1]  # the reader found the imports at all


def test_no_import_cycles_between_modules():
    modules = imports_by_module()
    # Edges only between modules of this repo (names inside a module were already mapped to it).
    graph = {m: sorted(n for n in names if n in modules and n != m) for m, (_, names) in modules.items()}
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_benchmark_code_inside_the_product_packages():
    found = [str(p.relative_to(REPO)) for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*"))
             if "__pycache__" not in p.parts and "bench" in p.name.lower()]
    assert not found, f"benchmark files belong in bench/, not the product: {found}"


def test_wheel_ships_the_product_without_bench_or_tests(tmp_path):
    from train.wheel import build_wheel

    with zipfile.ZipFile(build_wheel(tmp_path)) as zf:
        names = zf.namelist()
    stray = [n for n in names if n.split("/")[0] in (BENCH, "tests")]
    assert not stray, f"the wheel holds non-product files: {stray}"
    assert {"cli/config.py", "model/run.py"} <= set(names)
