"""Domain extensions of the engine: render farm and scientific computing."""

__all__: list[str] = []
