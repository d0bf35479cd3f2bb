"""The command line: the coordinator, the agent, the client commands and the operator verbs.

Domain command modules (``taskfarm render ...``, ``taskfarm science ...``) stay thin with
:func:`add_client_arguments` (the flags that reach a coordinator) and
:func:`run_policy_command` (one policy command, its JSON result back).
"""

from ._agent import main_with_executor
from ._client import (
    RequestError,
    add_client_arguments,
    ensure_token_file,
    parse_address,
    run_policy_command,
)
from ._policies import load_event_codecs, load_policy

__all__ = [
    "RequestError",
    "add_client_arguments",
    "ensure_token_file",
    "load_event_codecs",
    "load_policy",
    "main_with_executor",
    "parse_address",
    "run_policy_command",
]
