"""A real single-node Slurm cluster on this machine, for the Slurm tests.

:func:`start_slurm_cluster` writes a ``slurm.conf`` into a folder of its own, creates a munge
key, and starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as children of the
test process (root is needed: ``slurmd`` runs jobs as their user).  Everything is private to
that folder and to two free ports: its own munge socket (``AuthInfo=socket=...``), state, spool
and logs, and ``$SLURM_CONF`` pointing at the file, so two harnesses on one machine (two
worktrees' test runs) do not see each other, and nothing in ``/etc`` is read or changed.  The
configuration is the smallest that runs real jobs: ``proctrack/linuxproc`` (no cgroups),
``task/none``, no accounting, one node on this host with a few CPUs (``config_overrides``
lets it claim more than the machine has), one partition.

:meth:`SlurmCluster.close` cancels every job, stops the daemons, and kills whatever is left
that carries the cluster's marker in its environment (step daemons and the processes of jobs
submitted with :meth:`SlurmCluster.env`).

The tests skip, saying why, only when Slurm cannot run here at all (the packages are missing:
``.ci/run`` installs them; not root); a cluster that is installed but does not come up fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
MARKER_VARIABLE = "TASKFARM_SLURM_HARNESS"
PARTITION = "debug"
NODE = "tfnode1"
_START_LIMIT = 60.0  # seconds for the daemons to come up (a busy 2-core machine)
_POLL = 0.1


def program(name: str) -> str | None:
    """Return the path of a Slurm or munge program (daemons live in sbin, which a user's
    PATH may lack), or None."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def slurm_unavailable() -> str | None:
    """Return why a Slurm cluster cannot run on this machine, or None if it can."""
    missing = [name for name in PROGRAMS if program(name) is None]
    if missing:
        return (
            f"Slurm is not installed here (missing {', '.join(missing)}); "
            "`.ci/run` installs it: apt-get install -y slurm-wlm munge"
        )
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SlurmCluster:
    """A running single-node Slurm cluster (see :func:`start_slurm_cluster`)."""

    def __init__(self, root: Path, *, cpus: int, memory_mb: int) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.partition = PARTITION
        self.node = NODE
        self.host = socket.gethostname().split(".")[0]
        self.marker = uuid.uuid4().hex
        self.ctld_port = _free_port()
        self.slurmd_port = _free_port()
        self._daemons: list[tuple[str, subprocess.Popen[bytes]]] = []

    # -- configuration -----------------------------------------------------------------------

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Return an environment whose Slurm commands talk to this cluster (and whose jobs
        carry its marker, so :meth:`close` finds their processes)."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER_VARIABLE] = self.marker
        # A Slurm variable inherited from an outer allocation would confuse the commands.
        for name in list(env):
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del env[name]
        return env

    def _write_configuration(self) -> None:
        root = self.root
        for folder in ("munge", "state", "spool", "log"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "plugstack.conf").write_text("")  # not /etc/slurm's
        lines = [
            f"ClusterName=tf{self.marker[:8]}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={root / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "KillWait=10",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            f"NodeName={self.node} NodeHostname={self.host} NodeAddr=127.0.0.1 "
            f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE "
            "State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # -- processes ---------------------------------------------------------------------------

    def _daemon(self, name: str, *argv: str) -> None:
        log = self.root / "log" / f"{name}.out"
        path = program(argv[0])
        assert path is not None, f"{argv[0]} is not installed"
        with log.open("ab") as output:
            process = subprocess.Popen(
                [path, *argv[1:]],
                stdout=output,
                stderr=output,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
            )
        self._daemons.append((name, process))

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against this cluster; return its result."""
        return subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, check=check, timeout=60
        )

    def _wait(self, what: str, ready: object) -> None:
        deadline = time.monotonic() + _START_LIMIT
        while time.monotonic() < deadline:
            for name, process in self._daemons:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with status {process.returncode} while waiting for "
                        f"{what}\n{self.diagnostics()}"
                    )
            if callable(ready) and ready():
                return
            time.sleep(_POLL)  # a probe of another process's state, bounded by the deadline
        raise RuntimeError(f"timed out waiting for {what}\n{self.diagnostics()}")

    def start(self) -> None:
        """Write the configuration and start munged, slurmctld and slurmd; return once the
        node is idle in ``sinfo``."""
        self._write_configuration()
        munge = self.root / "munge"
        self._daemon(
            "munged",
            "munged",
            "--foreground",
            "--force",
            f"--socket={munge / 'munge.socket'}",
            f"--key-file={munge / 'munge.key'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        self._wait("munged's socket", lambda: (munge / "munge.socket").exists())
        self._daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait(
            "slurmctld to answer", lambda: "UP" in self.run("scontrol", "ping", check=False).stdout
        )
        self._daemon("slurmd", "slurmd", "-D", "-N", self.node, "-f", str(self.conf))
        self._wait("the node to be idle", self._node_idle)

    def _node_idle(self) -> bool:
        state = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).stdout
        return state.strip() == "idle"

    def jobs(self) -> dict[str, str]:
        """Return the cluster's jobs that have not ended, by id: their state."""
        result = self.run("squeue", "-h", "-o", "%i %T")
        return dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())

    def job_state(self, job_id: str) -> str:
        """Return a job's state as the controller knows it (ended jobs too)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for word in result.stdout.split():
            if word.startswith("JobState="):
                return word.partition("=")[2]
        return "UNKNOWN"

    def diagnostics(self, lines: int = 30) -> str:
        """Return the tail of the daemons' logs (for assertion messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def close(self) -> None:
        """Cancel every job, stop the daemons, kill whatever carries the cluster's marker."""
        try:
            if self._daemons and all(p.poll() is None for _, p in self._daemons):
                self.run("scancel", "--user", "root", check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.jobs():
                    time.sleep(_POLL)
        except (OSError, subprocess.SubprocessError):
            pass  # a broken cluster: kill it below
        finally:
            for _, process in reversed(self._daemons):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=10)
            self._daemons.clear()
            _kill_marked(self.marker)


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries ``marker``."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@contextmanager
def start_slurm_cluster(
    root: Path, *, cpus: int = 4, memory_mb: int = 4000
) -> Iterator[SlurmCluster]:
    """Start a single-node Slurm cluster in ``root`` (see the module); stop it on exit."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged checks the socket's folders
    cluster = SlurmCluster(root, cpus=cpus, memory_mb=memory_mb)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
