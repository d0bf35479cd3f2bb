"""The scientific domain: staged simulations that checkpoint, and a heat solver for the demo."""

__all__: list[str] = []
