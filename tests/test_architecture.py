"""The layering rules of DESIGN.md, checked on the source: imports only go down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["runtime", "persistence", "actors", "domains"]  # bottom to top
DOMAINS = ["render_farm", "scientific"]

# Each third-party library sits behind one module (its only importer).
SOLE_IMPORTERS = {
    "aiosqlite": "persistence/_sqlite.py",
    "networkx": "actors/engine/_graph.py",
    "structlog": "runtime/_logging.py",
    "statsmodels": "domains/scientific/_smoothing.py",
    # Each domain wraps its own charts (neither imports the other).
    "matplotlib": ("domains/render_farm/_chart.py", "domains/scientific/_charts.py"),
}


def _sources() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.append(node.module)
    return names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path: Path) -> None:
    """A module imports only its own layer and the layers below it; domains stay apart."""
    parts = path.relative_to(ROOT).parts
    layer = parts[0]
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for name in _imports(path):
        top = name.split(".")[0]
        if top in LAYERS:
            assert top in allowed, f"{path.relative_to(ROOT)} imports {name} (a higher layer)"
        if layer == "domains" and len(parts) > 2 and top == "domains":
            own = parts[1]
            other = name.split(".")[1] if "." in name else ""
            assert other not in DOMAINS or other == own, (
                f"{path.relative_to(ROOT)} imports {name}: the two domains never import each other"
            )


# The wings of ``actors``, bottom to top: a wing imports only the wings below it.
WINGS = ["executors", "engine", "cluster", "slurm", "cli", "bench"]
WING_ALLOWED = {
    "executors": {"executors"},
    "engine": {"executors", "engine"},
    "cluster": {"executors", "engine", "cluster"},
    "slurm": {"executors", "engine", "cluster", "slurm"},
    "cli": {"executors", "engine", "cluster", "slurm", "cli"},
    "bench": {"executors", "engine", "cluster", "slurm", "cli", "bench"},
}


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_packages_private_module(path: Path) -> None:
    """``a.b._c`` is private to package ``a.b``: only modules inside ``a.b`` import it."""
    package = _package_of(path)
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] not in LAYERS:
            continue
        private = [i for i, part in enumerate(parts) if part.startswith("_")]
        if not private:
            continue
        owner = ".".join(parts[: private[0]])
        assert package == owner or package.startswith(owner + "."), (
            f"{path.relative_to(ROOT)} imports {name}, a private module of {owner}"
        )


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "actors").rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_actors_wings_import_only_downwards(path: Path) -> None:
    """executors -> engine -> cluster -> slurm -> cli / bench: no wing reaches up."""
    parts = path.relative_to(ROOT).parts
    if len(parts) < 3:
        return  # actors/__init__.py and actors/_errors.py sit above and below every wing
    wing = parts[1]
    for name in _imports(path):
        names = name.split(".")
        if names[0] == "actors" and len(names) > 1 and names[1] in WINGS:
            assert names[1] in WING_ALLOWED[wing], (
                f"{path.relative_to(ROOT)} ({wing}) imports {name} (a higher wing)"
            )


@pytest.mark.parametrize("library", sorted(SOLE_IMPORTERS))
def test_third_party_library_behind_one_module(library: str) -> None:
    """Each wrapped third-party library is imported by exactly one module."""
    importers = sorted(
        str(path.relative_to(ROOT))
        for path in _sources()
        if any(name.split(".")[0] == library for name in _imports(path))
    )
    allowed = SOLE_IMPORTERS[library]
    assert importers == ([allowed] if isinstance(allowed, str) else sorted(allowed))
