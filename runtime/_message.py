"""The base of every typed message: commands, events, queries and replies."""

from __future__ import annotations

import msgspec

__all__ = ["Message"]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base for every message; subclasses repeat ``kw_only=True`` and set an explicit ``tag``.

    Tags are namespaced and stable (``tag="render.frame_completed"``) because they are
    journaled and sent over the wire; a class rename must never change them.
    """
