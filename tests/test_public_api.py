"""Each package re-exports its public names through a sorted, importable ``__all__``."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "runtime",
    "persistence",
    "actors",
    "actors.executors",
    "actors.engine",
    "actors.cluster",
    "actors.slurm",
    "actors.cli",
    "actors.bench",
    "domains",
    "domains.render_farm",
    "domains.scientific",
]


def _isort_style(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    if name.isupper():
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted_and_resolves(package: str) -> None:
    """``__all__`` is sorted, has no private names, and every name exists."""
    module = importlib.import_module(package)
    names = list(module.__all__)
    assert names == sorted(names, key=_isort_style)
    assert not [name for name in names if name.startswith("_")]
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_are_in_all(package: str) -> None:
    """Nothing public is exported by accident: public attributes are listed in ``__all__``."""
    module = importlib.import_module(package)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, type(importlib))
    }
    assert public <= set(module.__all__)
