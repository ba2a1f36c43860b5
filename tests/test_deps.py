"""pyproject's runtime dependencies and the product's imports agree (issue 16: versions that are true).

Every distribution in [project].dependencies is imported somewhere in the product packages (cli data
model infer train), found with ast; every third-party module they import is declared. Distribution
names are mapped to import names through the installed distributions' files
(importlib.metadata.packages_distributions: scikit-learn -> sklearn, pyyaml -> yaml, ...).
The few exceptions below say why. With ARENA_PREF_LOWEST=1 (the CI run in a venv built with
`uv pip install --resolution lowest-direct`) the installed versions must equal the declared lower bounds.
"""
from __future__ import annotations

import ast
import os
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("cli", "data", "model", "infer", "train")

# Runtime dependencies that a library imports on our behalf (declared, not imported by our code).
INDIRECT = {
    "accelerate": "transformers' Trainer (train/fold.py) needs it at run time; transformers declares it only in extras",
    "gguf": "transformers reads the GGUF base (model/gguf.py, from_pretrained(gguf_file=)) with it; declared only in extras",
}
# Third-party imports that are deliberately not runtime dependencies.
OPTIONAL = {
    "kaggle": "train/kaggle_upload.py, only for `train.export --upload`; checked with find_spec first",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement(spec: str) -> tuple[str, str]:
    """'transformers>=5.17,<6' -> ('transformers', '>=5.17,<6'); markers and extras are not used here."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)", spec)
    assert m, spec
    return norm(m.group(1)), m.group(2).replace(" ", "")


def declared() -> dict[str, str]:
    return dict(requirement(s) for s in project()["dependencies"])


def product_imports() -> dict[str, set[str]]:
    """top-level module -> files of the product packages importing it (absolute imports, any depth, lazy ones too)."""
    found: dict[str, set[str]] = {}
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PRODUCT:
                        found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def module_to_dists() -> dict[str, set[str]]:
    return {mod: {norm(d) for d in dists} for mod, dists in packages_distributions().items()}


def import_names(dist: str) -> set[str]:
    return {mod for mod, dists in module_to_dists().items() if dist in dists}


def test_scan_sees_the_product():
    imports = product_imports()
    assert {"torch", "transformers", "peft", "pandas", "yaml", "sklearn"} <= set(imports)
    assert all(f.split("/")[0] in PRODUCT for files in imports.values() for f in files)


@pytest.mark.parametrize("dist", sorted(declared()))
def test_declared_dependency_is_imported(dist):
    names = import_names(dist)
    assert names, f"{dist}: declared in pyproject but not installed here (no import names found)"
    used = names & set(product_imports())
    if dist in INDIRECT:
        assert not used, f"{dist} is imported by the product now ({sorted(used)}): drop it from INDIRECT"
        return
    assert used, (f"{dist} (imports as {sorted(names)}) is declared in [project].dependencies but imported nowhere "
                  f"in {'/'.join(PRODUCT)}: drop it, move it to an extra, or say in INDIRECT why it is needed")


def test_imported_third_party_is_declared():
    deps = set(declared())
    mod_dists = module_to_dists()
    undeclared = {}
    for mod, files in product_imports().items():
        if mod in OPTIONAL:
            continue
        dists = mod_dists.get(mod, set())
        if not dists & deps:
            undeclared[mod] = (sorted(dists) or ["not installed"], sorted(files))
    assert not undeclared, f"imported by the product but not in [project].dependencies: {undeclared}"


def test_every_dependency_has_a_lower_bound_and_the_fast_movers_a_major_cap():
    deps = declared()
    assert not [d for d, spec in deps.items() if not re.search(r">=\d", spec)], "a runtime dependency without >= bound"
    for dist in ("transformers", "peft", "trl", "datasets"):
        major = int(re.search(r">=(\d+)", deps[dist]).group(1))
        assert f"<{major + 1}" in deps[dist].split(","), f"{dist}: cap it below its next major (<{major + 1})"


def test_exception_lists_are_current():
    deps = set(declared())
    assert set(INDIRECT) <= deps, "INDIRECT names a distribution pyproject no longer declares"
    stale = set(OPTIONAL) - set(product_imports())
    assert not stale, f"OPTIONAL names modules the product no longer imports: {sorted(stale)}"


def release(v: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13); '5.17' -> (5, 17): numeric release with trailing zeros dropped."""
    parts = [int(p) for p in re.match(r"\d+(?:\.\d+)*", v).group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


@pytest.mark.skipif(os.environ.get("ARENA_PREF_LOWEST") != "1", reason="only in the lowest-direct venv (ARENA_PREF_LOWEST=1)")
def test_lowest_venv_runs_the_declared_lower_bounds():
    """Each lower bound is the version the lowest-direct CI run really tested (torch: only 2.13.0 installs here)."""
    specs = [requirement(s) for s in project()["dependencies"] + project()["optional-dependencies"]["dev"]]
    wrong = {}
    for dist, spec in specs:
        low = re.search(r">=([0-9][0-9.]*)", spec)
        if dist == "torch" or not low:
            continue
        try:
            have = version(dist)
        except PackageNotFoundError:
            have = "not installed"
        if have == "not installed" or release(have) != release(low.group(1)):
            wrong[dist] = f"declared >={low.group(1)}, lowest-direct installed {have}"
    assert not wrong, f"lower bounds that are not what the lowest run tests (raise them): {wrong}"
