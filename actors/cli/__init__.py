"""The command line: the coordinator, the agent and the client commands."""

from ._agent import main_with_executor
from ._commands import ensure_token_file, parse_address

__all__ = ["ensure_token_file", "main_with_executor", "parse_address"]
