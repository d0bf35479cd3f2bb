"""The engine's benchmark suites (``taskfarm bench engine``, ``taskfarm bench checkpoints``)."""

from ._checkpoints import CHECKPOINTS_SUITE
from ._engine import SUITE

__all__ = ["CHECKPOINTS_SUITE", "SUITE"]
