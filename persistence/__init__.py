"""The event journal: codec, in-memory and SQLite journals, snapshots and replay."""

__all__: list[str] = []
