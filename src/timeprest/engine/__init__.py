"""Engines that execute per-stage programs: the single-process emulator (and the runtime)."""

from timeprest.engine.emulator import MailboxTransport, run_emulated

__all__ = ["MailboxTransport", "run_emulated"]
