"""The domain-agnostic engine: jobs, nodes, the scheduler, resources and dependencies."""

__all__: list[str] = []
