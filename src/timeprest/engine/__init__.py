"""Engines that execute lowered programs: the single-process emulator and the distributed runtime."""

from timeprest.engine.emulator import CheckingMailbox, Emulator, run_emulated
from timeprest.engine.executor import StageExecutor, Transport
from timeprest.engine.protocol import Engine, Job, Outcome

__all__ = [
    "CheckingMailbox",
    "Emulator",
    "Engine",
    "Job",
    "Outcome",
    "StageExecutor",
    "Transport",
    "run_emulated",
]
