"""Typed exceptions for user errors.

Every user-facing error derives from :class:`TimeprestError`; the CLI turns
any of them into one line on stderr and exit code 2. ``assert`` is kept for
internal invariants only.
"""

from __future__ import annotations


class TimeprestError(Exception):
    """Base class of every error caused by user input or user data."""


class ConfigError(TimeprestError, ValueError):
    """A bad option, or a combination of options that cannot work."""


class ScheduleError(TimeprestError):
    """A schedule (per-stage programs) that is incomplete, inconsistent or deadlocks."""


class ShapeError(TimeprestError):
    """A stage cannot consume what the previous stage produces."""


class NonFiniteLossError(TimeprestError):
    """The loss of a mini-batch is NaN or infinite; training stops."""


class DataError(TimeprestError):
    """A dataset is missing, unreadable or malformed."""


class MultipleSequenceWarning(UserWarning):
    """nF1B with fewer than W-1 micro-batches splits the updates into independent chains."""


class StageFailure(TimeprestError):
    """Another rank of the distributed pipeline failed, so this rank stopped too."""
