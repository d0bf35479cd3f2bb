"""The engine's benchmark suite (``taskfarm bench engine``)."""

from ._engine import SUITE

__all__ = ["SUITE"]
