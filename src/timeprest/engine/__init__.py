"""Engines that execute lowered programs: the single-process emulator and the distributed runtime."""

from timeprest.engine.emulator import Emulator, run_emulated
from timeprest.engine.executor import StageExecutor, Transport
from timeprest.engine.mailbox import CheckingMailbox, drive
from timeprest.engine.protocol import Engine, Job, Outcome

__all__ = [
    "CheckingMailbox",
    "Emulator",
    "Engine",
    "Job",
    "Outcome",
    "StageExecutor",
    "drive",
    "Transport",
    "run_emulated",
]
