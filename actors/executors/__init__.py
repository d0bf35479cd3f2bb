"""Where an attempt runs (in-process, a local subprocess, simulated) and what it reports back."""

from ._inprocess import AttemptContext, InProcessExecutor, Work, open_inprocess_executor
from ._interface import (
    PATH_SAFE_PATTERN,
    AttemptCheckpointed,
    AttemptFinished,
    AttemptHandle,
    AttemptIdentity,
    AttemptMetric,
    AttemptOutcome,
    AttemptPreview,
    AttemptProgress,
    AttemptReport,
    AttemptSpec,
    AttemptStarted,
    Executor,
    ReportSink,
    RunningAttempt,
    attempt_identity,
    gang_environment,
)
from ._simulated import SimulatedExecutor, open_simulated_executor
from ._subprocess import (
    FRAME_SEQUENCE,
    REPORT_PREFIX,
    SubprocessExecutor,
    open_subprocess_executor,
    parse_report_line,
)
from ._warden import EXECUTOR_ID_VARIABLE, kill_marked

__all__ = [
    "EXECUTOR_ID_VARIABLE",
    "FRAME_SEQUENCE",
    "PATH_SAFE_PATTERN",
    "REPORT_PREFIX",
    "AttemptCheckpointed",
    "AttemptContext",
    "AttemptFinished",
    "AttemptHandle",
    "AttemptIdentity",
    "AttemptMetric",
    "AttemptOutcome",
    "AttemptPreview",
    "AttemptProgress",
    "AttemptReport",
    "AttemptSpec",
    "AttemptStarted",
    "Executor",
    "InProcessExecutor",
    "ReportSink",
    "RunningAttempt",
    "SimulatedExecutor",
    "SubprocessExecutor",
    "Work",
    "attempt_identity",
    "gang_environment",
    "kill_marked",
    "open_inprocess_executor",
    "open_simulated_executor",
    "open_subprocess_executor",
    "parse_report_line",
]
