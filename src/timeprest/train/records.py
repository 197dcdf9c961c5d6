"""What a run records: one row per epoch, one line per mini-batch, and the summary.

:class:`EpochRow` is the one type of an ``epochs.jsonl`` line: the loop builds
it from the pipeline's report, and the summary, the plots, TensorBoard and
``timeprest compare`` read it back with :func:`read_epochs`. The keys of the
JSON files are the field names, in field order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from timeprest.errors import ConfigError

if TYPE_CHECKING:
    from timeprest.report import Report
    from timeprest.tasks import Metrics
    from timeprest.train.config import TrainConfig


@dataclass(frozen=True)
class EpochRow:
    """One line of ``epochs.jsonl``: losses, accuracy, time and per-stage figures.

    Per-stage fields are lists with one value per stage. ``test_*`` are the
    held-out figures: the test set of an image dataset, the validation part of
    a text corpus (where the loss is in nats per token and the accuracy that
    of the next byte).
    """

    epoch: int
    """Epochs done, counting from 1."""
    train_loss: float
    """Mean of the epoch's mini-batch losses."""
    test_loss: float
    test_accuracy: float
    """Fraction of the test rows classified right, in [0, 1]."""
    epoch_time: float
    """Seconds of training in this epoch (evaluation excluded)."""
    wall_time: float
    """Seconds since the run started (resumed runs included), at the end of this epoch."""
    samples_per_s: float
    lr_factor_end: float
    """The learning-rate factor of the epoch's last update."""
    mean_staleness: list[float]
    mean_relative_distance: list[float | None]  # None: not measured in the epoch
    peak_versions: list[int]
    peak_weight_bytes: list[int]
    weight_bytes: list[int]
    peak_activation_bytes: list[int]
    optimizer_state_bytes: list[int]
    task: str = "classification"
    """``classification`` or ``lm`` (causal language modelling)."""
    test_bits_per_byte: float | None = None
    """Held-out loss in bits per byte (byte-level language models)."""
    test_perplexity: float | None = None
    """e to the held-out loss per token (language models)."""

    @classmethod
    def from_report(
        cls,
        epoch: int,
        losses: Sequence[float],
        test: Metrics,
        train_time: float,
        wall: float,
        rows: int,
        lr_end: float,
        report: Report,
        *,
        task: str = "classification",
    ) -> EpochRow:
        """The row of an epoch from its losses, its evaluation and the pipeline's report."""
        stages = range(len(report.stages))
        return cls(
            epoch=epoch,
            train_loss=sum(losses) / len(losses),
            test_loss=test.loss,
            test_accuracy=test.accuracy,
            epoch_time=train_time,
            wall_time=wall,
            samples_per_s=rows / train_time,
            lr_factor_end=lr_end,
            mean_staleness=[report.mean_staleness(s) for s in stages],
            mean_relative_distance=[report.mean_relative_distance(s) for s in stages],
            peak_versions=[r.peak_versions for r in report.stages],
            peak_weight_bytes=[r.peak_weight_bytes for r in report.stages],
            weight_bytes=[r.weight_bytes for r in report.stages],
            peak_activation_bytes=[r.peak_activation_bytes for r in report.stages],
            optimizer_state_bytes=[r.optimizer_state_bytes for r in report.stages],
            task=task,
            test_bits_per_byte=test.bits_per_byte,
            test_perplexity=test.perplexity,
        )

    def describe(self) -> str:
        """The epoch's log line figures."""
        text = f"train loss {self.train_loss:.4f}, "
        if self.test_bits_per_byte is not None:
            return text + (
                f"validation loss {self.test_loss:.4f} nats/token, "
                f"{self.test_bits_per_byte:.4f} bits/byte, perplexity {self.test_perplexity:.2f}"
            )
        return (
            text + f"test loss {self.test_loss:.4f}, test accuracy {self.test_accuracy * 100:.2f}%"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "epochs.jsonl") -> EpochRow:
        """The row of a JSON object; ConfigError naming the missing fields (another writer)."""
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(
                f"{where}: epoch {d.get('epoch', '?')} lacks {', '.join(missing)}; "
                "was it written by timeprest train?"
            )
        return cls(**{k: d[k] for k in names if k in d})

    @property
    def num_stages(self) -> int:
        return len(self.peak_versions)


def read_epochs(run_dir: Path) -> list[EpochRow]:
    """The rows of ``run_dir/epochs.jsonl`` (empty when there is none)."""
    log = run_dir / "epochs.jsonl"
    if not log.is_file():
        return []
    try:
        text = log.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{log} is unreadable: not UTF-8 text") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{log}, line {n}: not JSON ({exc})") from None
        rows.append(EpochRow.from_dict(data, str(log)))
    return rows


def append_epoch(path: Path, row: EpochRow) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row.to_dict()) + "\n")


def append_minibatches(path: Path, report: Report, epoch: int) -> None:
    """Append the report's mini-batch records (loss, versions, staleness) to minibatches.jsonl."""
    with path.open("a") as f:
        for m in report.minibatches:
            record = {
                "minibatch": m.minibatch,
                "epoch": epoch,
                "loss": m.loss,
                "forward_versions": [s.forward_versions for s in m.stages],
                "backward_version": [s.backward_version for s in m.stages],
                "staleness": [s.staleness for s in m.stages],
                "relative_distance": [s.relative_distance for s in m.stages],
            }
            f.write(json.dumps(record) + "\n")


def append_eval(path: Path, epoch: int, minibatches: int, metrics: Metrics) -> None:
    """Append one held-out evaluation (``--eval-every``, and each epoch's end) to evals.jsonl.

    ``minibatches`` is the number of mini-batches trained when it was taken.
    """
    record = {"epoch": epoch, "minibatches": minibatches, **dataclasses.asdict(metrics)}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def trim_logs(
    epochs_log: Path,
    mb_log: Path,
    history: Sequence[EpochRow],
    done: int,
    evals_log: Path | None = None,
) -> None:
    """Rewrite the logs to what a checkpoint covers: an epoch cut short is redone."""
    epochs_log.write_text("".join(json.dumps(h.to_dict()) + "\n" for h in history))
    for log, key, keep in ((mb_log, "minibatch", done), (evals_log, "minibatches", done + 1)):
        if log is not None and log.exists():
            kept = [ln for ln in log.read_text().splitlines() if json.loads(ln)[key] < keep]
            log.write_text("".join(ln + "\n" for ln in kept))


def epochs_to_target(history: Sequence[EpochRow], target: float | None) -> int | None:
    """The first epoch whose test accuracy reaches ``target`` (None: never, or no target)."""
    if target is None:
        return None
    return next((h.epoch for h in history if h.test_accuracy >= target), None)


def summarize(cfg: TrainConfig, history: Sequence[EpochRow]) -> dict[str, Any]:
    """The run's summary.json from its epoch rows (resumed epochs included)."""
    if not history:
        raise ConfigError("no epoch was trained: --epochs must be >= 1")
    last = history[-1]
    best = max(history, key=lambda h: h.test_accuracy)
    return {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "stages": cfg.stages,
        "microbatches": cfg.num_microbatches,
        "epochs": len(history),
        "final_test_accuracy": last.test_accuracy,
        "final_test_loss": last.test_loss,
        "final_train_loss": last.train_loss,
        "best_test_accuracy": best.test_accuracy,
        "best_epoch": best.epoch,
        "target_accuracy": cfg.target_accuracy,
        "epochs_to_target": epochs_to_target(history, cfg.target_accuracy),
        "wall_time": last.wall_time,
        "mean_epoch_time": sum(h.epoch_time for h in history) / len(history),
        "mean_staleness": last.mean_staleness,
        "mean_relative_distance": last.mean_relative_distance,
        "peak_versions": last.peak_versions,
        "peak_weight_bytes": last.peak_weight_bytes,
        "peak_activation_bytes": last.peak_activation_bytes,
        "optimizer_state_bytes": last.optimizer_state_bytes,
        "task": last.task,
        "final_val_loss": last.test_loss,
        "final_bits_per_byte": last.test_bits_per_byte,
        "final_perplexity": last.test_perplexity,
    }


def describe_summary(summary: dict[str, Any]) -> str:
    """The final figures of a run's summary, for its last log line."""
    if summary.get("final_bits_per_byte") is not None:
        return (
            f"final validation loss {summary['final_val_loss']:.4f} nats/token, "
            f"{summary['final_bits_per_byte']:.4f} bits/byte"
        )
    return (
        f"final test accuracy {summary['final_test_accuracy'] * 100:.2f}%, "
        f"best {summary['best_test_accuracy'] * 100:.2f}%"
    )
