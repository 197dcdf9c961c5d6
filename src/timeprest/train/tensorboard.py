"""Per-epoch scalars for TensorBoard, when the ``tensorboard`` package is installed.

The training loop calls :meth:`EpochWriter.write` with each row it appends to
``epochs.jsonl``; the writer turns it into scalars under ``RUN_DIR/tensorboard``
(view with ``tensorboard --logdir runs``). Without the package the writer
does nothing, so training never depends on it. The JSON files of the run
directory stay the record; these event files are a view of them.

Tags: ``test/accuracy``, ``test/loss``, ``train/loss``, ``time/epoch_s``,
``time/samples_per_s``, and per stage ``staleness/stage<s>``,
``relative_distance/stage<s>``, ``weight_versions/stage<s>``,
``peak_weight_bytes/stage<s>``; the step is the epoch number.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from timeprest.train.records import EpochRow

# scalar fields of an epoch row (timeprest.train.records.EpochRow) and their tags
_SCALARS = {
    "test_accuracy": "test/accuracy",
    "test_loss": "test/loss",
    "train_loss": "train/loss",
    "epoch_time": "time/epoch_s",
    "samples_per_s": "time/samples_per_s",
}
# per-stage list fields and the tag prefix of each
_PER_STAGE = {
    "mean_staleness": "staleness",
    "mean_relative_distance": "relative_distance",
    "peak_versions": "weight_versions",
    "peak_weight_bytes": "peak_weight_bytes",
}


class _Writer(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def summary_writer_class() -> Callable[..., _Writer] | None:
    """torch's SummaryWriter, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when tensorboard is not installed
        return None
    return SummaryWriter


class EpochWriter:
    """Writes one epoch row at a time; a no-op when tensorboard is not installed.

    ``start_epoch`` is the number of epochs already done (a resumed run):
    events of later epochs left by an interrupted run are discarded, so a
    redone epoch is not drawn twice.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        start_epoch: int = 0,
        enabled: bool = True,
    ) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        cls = summary_writer_class() if enabled else None
        self._writer: _Writer | None = None
        if cls is not None:
            # purge_step drops events at steps >= it: the epochs about to be (re)done
            self._writer = cls(log_dir=str(self.log_dir), purge_step=start_epoch + 1)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def write(self, row: EpochRow) -> None:
        """Log an epoch row at step ``row.epoch``; flushed so a crash keeps it."""
        if self._writer is None:
            return
        step = row.epoch
        for key, tag in _SCALARS.items():
            self._writer.add_scalar(tag, float(getattr(row, key)), step)
        for key, prefix in _PER_STAGE.items():
            for s, value in enumerate(getattr(row, key)):
                if value is not None:  # None: not measured in this epoch
                    self._writer.add_scalar(f"{prefix}/stage{s}", float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
