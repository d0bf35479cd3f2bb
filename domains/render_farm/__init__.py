"""The render-farm domain: frame jobs, chunking, and a tiny built-in renderer for the demo."""

__all__: list[str] = []
