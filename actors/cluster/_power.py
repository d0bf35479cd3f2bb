"""Sleeping and waking nodes for real: a command on the node, a command on the coordinator.

A node's health ``sleeping`` (set by a policy's ``node_actions`` or ``taskfarm node sleep``)
keeps work off it; this module makes the host actually sleep and wake:

- The agent runs its ``--sleep-command`` (``systemctl suspend``) when the coordinator sends
  ``SleepNode``.  :class:`PowerControl` sends it once the node is sleeping *and* nothing runs
  there (neither in the scheduler's books nor in the node's executor), so work that runs when
  the decision is taken finishes first; the end of its last attempt re-checks.  The agent
  refuses a ``SleepNode`` while it runs attempts (a second guard, on the node itself).
- When the node's health leaves ``sleeping`` (a policy's wake or ``taskfarm node resume``)
  while its agent is away, the coordinator runs its ``--wake-command`` with ``{node}``,
  ``{mac}`` (the node's ``mac=`` label) and ``{address}`` (the host its agent last connected
  from) substituted; the node is online again once its agent reconnects.

The coordinator learns of health changes from its own journal (a subscription from the
position it started at): the engine needs no hook, and a change by any actor is seen.
Commands run as child processes with a time limit, never through a shell, each in its own
task: neither the coordinator nor the agent waits for one.
"""

from __future__ import annotations

import shlex
import string
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup, TaskStatus

from actors.engine import (
    Engine,
    NodeHealthChanged,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskPreempted,
    TaskRequeued,
)
from runtime import Clock, ConfigurationError, TaskfarmError, get_logger

from ._protocol import SleepNode
from ._remote import RemoteExecutor

__all__ = [
    "COMMAND_TIMEOUT",
    "WAKE_PLACEHOLDERS",
    "CommandResult",
    "PowerControl",
    "parse_command",
    "run_command",
    "sleep_node",
]

_log = get_logger("actors.power")

COMMAND_TIMEOUT = 60.0
"""Seconds a sleep or wake command may run before it is killed (and its failure logged)."""
WAKE_PLACEHOLDERS = ("node", "mac", "address")
"""What ``serve --wake-command`` may contain in braces."""
_RECHECK = 1.0  # seconds between re-checks of a sleeping node whose work is ending
_STDERR_KEPT = 4096  # bytes of a command's standard error kept (its last line is logged)
_WAKES_AT_ONCE = 16  # wake commands running at the same time (a policy may wake many nodes)
_ENDS = (TaskCompleted, TaskFailed, TaskRequeued, TaskPreempted, TaskCancelled)


def parse_command(text: str, *, where: str, placeholders: Sequence[str] = ()) -> tuple[str, ...]:
    """Split a command line as a POSIX shell would (no shell runs it) and check it.

    Raises:
        ConfigurationError: it is empty, cannot be split (an unclosed quote), or uses a
            placeholder not in ``placeholders`` (``where`` names the flag).
    """
    try:
        argv = tuple(shlex.split(text))
    except ValueError as error:
        raise ConfigurationError(f"cannot split {text!r}: {error}", where=where) from None
    if not argv:
        raise ConfigurationError("the command is empty", where=where)
    allowed = ", ".join(f"{{{name}}}" for name in placeholders) or "none"
    for argument in argv:
        for name in _fields(argument, where=where):
            if name not in placeholders:
                raise ConfigurationError(
                    f"unknown placeholder {{{name}}} in {argument!r} (placeholders: {allowed})",
                    where=where,
                )
    return argv


def _fields(argument: str, *, where: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(argument) if name is not None]
    except ValueError as error:  # a lone brace
        raise ConfigurationError(
            f"{argument!r}: {error} (write a literal brace as {{{{ or }}}})", where=where
        ) from None


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    """How a command ended: ``status`` is its exit status (None: it could not start or timed
    out, ``error`` says which); ``stderr`` is the last line it wrote to standard error."""

    status: int | None
    stderr: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """Return whether it exited with status 0."""
        return self.status == 0


async def run_command(argv: Sequence[str], *, time_limit: float = COMMAND_TIMEOUT) -> CommandResult:
    """Run ``argv`` (no shell) for at most ``time_limit`` seconds; return how it ended."""
    tail = b""
    try:
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except OSError as error:
        return CommandResult(status=None, error=f"cannot run {argv[0]}: {error.strerror or error}")
    async with process:
        with anyio.move_on_after(time_limit) as scope:
            assert process.stderr is not None
            async for chunk in process.stderr:
                tail = (tail + chunk)[-_STDERR_KEPT:]
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            with anyio.move_on_after(5, shield=True):
                await process.wait()
    lines = tail.decode(errors="replace").strip().splitlines()
    last = lines[-1] if lines else ""
    if scope.cancelled_caught:
        return CommandResult(status=None, stderr=last, error=f"timed out after {time_limit:g} s")
    return CommandResult(status=process.returncode, stderr=last)


# -- the agent's side ---------------------------------------------------------------------------


async def sleep_node(
    command: Sequence[str],
    *,
    node_id: str,
    reason: str,
    running: int,
    time_limit: float = COMMAND_TIMEOUT,
) -> None:
    """Put this agent's host to sleep with ``command`` (``SleepNode`` from the coordinator).

    Refused while attempts run here (``running``); without a command the node is asleep only
    logically.  A failing command is logged; the agent carries on, connected.
    """
    if running:
        _log.warning("node_sleep_refused", node_id=node_id, running=running, reason=reason)
        return
    _log.info("node_sleeping", node_id=node_id, reason=reason, command=shlex.join(command))
    if not command:
        return
    result = await run_command(command, time_limit=time_limit)
    if result.ok:
        _log.info("node_sleep_command_done", node_id=node_id)
    else:
        _log.warning(
            "node_sleep_failed",
            node_id=node_id,
            status=result.status,
            stderr=result.stderr,
            error=result.error,
        )


# -- the coordinator's side ---------------------------------------------------------------------


class PowerControl:
    """Tells the agents of sleeping, idle nodes to sleep, and wakes nodes that leave sleep.

    Lives as long as the coordinator (``run`` in its task group).  ``executors`` is the
    coordinator's live map of node executors: the one of a node whose agent is connected is
    ``attached``.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        clock: Clock,
        executors: Mapping[str, RemoteExecutor],
        wake_command: tuple[str, ...] = (),
        time_limit: float = COMMAND_TIMEOUT,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._executors = executors
        self._wake_command = wake_command
        self._time_limit = time_limit
        self._sleeping: set[str] = set()  # nodes whose health is sleeping (from the journal)
        self._told: set[str] = set()  # ... whose connected agent was sent SleepNode
        self._deferred: set[str] = set()  # ... whose sleep waits for their work (logged once)
        self._addresses: dict[str, str] = {}  # node -> the host its agent last connected from
        self._poked = anyio.Event()
        self._wakes = anyio.CapacityLimiter(_WAKES_AT_ONCE)
        self._task_group: TaskGroup | None = None

    def agent_connected(self, name: str, address: str) -> None:
        """Note an agent's connection (and its host): a sleeping node's agent is told again."""
        self._addresses[name] = address
        self._told.discard(name)
        self._poked.set()

    def agent_disconnected(self, name: str) -> None:
        """Note that an agent's connection ended."""
        self._told.discard(name)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the journal from now on and act on it, until cancelled."""
        journal = self._engine.journal
        start = await journal.last_position()
        self._sleeping = {n.name for n in await self._engine.nodes() if n.health == "sleeping"}
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            task_group.start_soon(self._tell_sleepers)
            task_status.started()
            async with journal.subscribe(after=start) as subscription:
                async for batch in subscription:
                    for record in batch:
                        event = record.event
                        if isinstance(event, NodeHealthChanged):
                            self._health_changed(record.stream_id.partition(":")[2], event)
                        elif isinstance(event, _ENDS) and self._sleeping - self._told:
                            self._poked.set()
            task_group.cancel_scope.cancel()  # the journal closed: the coordinator stops

    def _health_changed(self, name: str, event: NodeHealthChanged) -> None:
        if event.health == "sleeping":
            self._sleeping.add(name)
            self._poked.set()
            return
        if name not in self._sleeping:
            return
        told = name in self._told
        self._sleeping.discard(name)
        self._told.discard(name)
        self._deferred.discard(name)
        executor = self._executors.get(name)
        if executor is not None and executor.attached and not told:
            return  # never told to sleep (it had work, or no agent): awake, nothing to wake
        # Told to sleep but still connected: a suspended host's connection lingers until its
        # heartbeat timeout, so it is woken all the same (waking an awake host is harmless).
        if not self._wake_command:
            _log.info("node_wake_not_sent", node_id=name, reason="no --wake-command")
            return
        assert self._task_group is not None
        self._task_group.start_soon(self._wake, name, event.by)

    async def _wake(self, name: str, by: str) -> None:
        try:
            nodes = await self._engine.nodes()
        except TaskfarmError as error:  # the engine is stopping: the next start sees the node
            _log.warning("node_wake_failed", node_id=name, error=str(error))
            return
        summary = next((n for n in nodes if n.name == name), None)
        labels = dict(
            label.split("=", 1) for label in (summary.labels if summary else ()) if "=" in label
        )
        values = {"node": name, "mac": labels.get("mac"), "address": self._addresses.get(name)}
        missing = sorted(
            {
                field
                for argument in self._wake_command
                for field in _fields(argument, where="--wake-command")
                if values.get(field) is None
            }
        )
        if missing:
            why = {
                "mac": "it has no mac= label (agent --label mac=...)",
                "address": "its agent has not connected since this coordinator started",
            }
            _log.error(
                "node_wake_failed",
                node_id=name,
                missing=missing,
                error="; ".join(
                    f"no {{{field}}} for node {name}: {why[field]}" for field in missing
                ),
            )
            return
        argv = [argument.format_map(values) for argument in self._wake_command]
        async with self._wakes:
            result = await run_command(argv, time_limit=self._time_limit)
        if result.ok:
            _log.info("node_wake_sent", node_id=name, by=by, command=shlex.join(argv))
        else:
            _log.warning(
                "node_wake_failed",
                node_id=name,
                status=result.status,
                stderr=result.stderr,
                error=result.error,
                command=shlex.join(argv),
            )

    async def _tell_sleepers(self) -> None:
        """Send SleepNode to each sleeping node's agent once its node runs nothing."""
        while True:
            waiting = [
                name
                for name in sorted(self._sleeping - self._told)
                if (executor := self._executors.get(name)) is not None and executor.attached
            ]
            await self._wait(recheck=bool(waiting))
            self._poked = anyio.Event()  # before looking: a change from now on wakes us again
            waiting = [
                name
                for name in sorted(self._sleeping - self._told)
                if (executor := self._executors.get(name)) is not None and executor.attached
            ]
            if not waiting:
                continue
            try:
                summaries = {n.name: n for n in await self._engine.nodes()}
            except TaskfarmError as error:  # the engine is stopping
                _log.info("node_sleep_check_skipped", error=str(error))
                continue
            for name in waiting:
                summary = summaries.get(name)
                executor = self._executors.get(name)
                # The scheduler's count covers an assignment not sent yet, the executor's an
                # attempt whose end the scheduler has not heard of yet: both must be empty.
                if summary is None or summary.health != "sleeping" or executor is None:
                    continue
                running = max(summary.running, len(executor.waiting_on()))
                if running:
                    if name not in self._deferred:
                        self._deferred.add(name)
                        _log.info("node_sleep_deferred", node_id=name, running=running)
                    continue
                if executor.send_nowait(SleepNode(reason=summary.reason)):
                    self._told.add(name)
                    self._deferred.discard(name)
                    _log.info("node_sleep_requested", node_id=name, reason=summary.reason)

    async def _wait(self, *, recheck: bool) -> None:
        """Wait for a poke; with ``recheck``, for at most ``_RECHECK`` seconds of the clock."""
        if not recheck:
            await self._poked.wait()
            return
        async with anyio.create_task_group() as group:

            async def timer() -> None:
                await self._clock.sleep(_RECHECK)
                group.cancel_scope.cancel()

            group.start_soon(timer)
            await self._poked.wait()
            group.cancel_scope.cancel()
