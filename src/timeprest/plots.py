"""Figures of training runs: what ``timeprest plot`` and ``timeprest compare`` draw.

``plot_runs([run_dir, ...], out_dir)`` reads each run directory written by
:func:`timeprest.train.run_training` (``config.json`` and ``epochs.jsonl``)
and writes four PNG files, one line or bar group per run:

================  ==============================================================
``accuracy.png``  test accuracy against epochs and against wall time
                  (``bits_per_byte.png`` instead, validation bits per byte, for language models)
``loss.png``      train loss against epochs and against wall time
``memory.png``    weight versions held and peak weight bytes, per stage
``staleness.png`` mean degree of staleness and relative weight distance, per stage
================  ==============================================================

A directory written by ``timeprest compare`` (no ``config.json`` itself, one
run directory per method inside) stands for the runs it holds.

matplotlib is imported only when drawing (``pip install timeprest[plot]``);
the figures are built with the object API on the Agg canvas, so no window
opens and no global pyplot state is touched.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from timeprest.errors import ConfigError
from timeprest.files import read_json
from timeprest.report import mean_known
from timeprest.train.records import EpochRow, read_epochs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_FILES = ("accuracy.png", "loss.png", "memory.png", "staleness.png")


@dataclass
class RunData:
    """What the figures need from one run directory."""

    path: Path
    config: dict[str, Any]
    epochs: list[EpochRow]
    label: str

    @property
    def num_stages(self) -> int:
        return self.epochs[-1].num_stages

    def stage_mean(self, key: str) -> list[float]:
        """Per-stage mean over epochs (every epoch has the same number of mini-batches),
        of the epochs where the figure was measured (NaN if none: not drawn)."""
        rows = [getattr(e, key) for e in self.epochs]
        means = [mean_known(r[s] for r in rows) for s in range(self.num_stages)]
        return [math.nan if m is None else m for m in means]

    def stage_peak(self, key: str) -> list[float]:
        rows = [getattr(e, key) for e in self.epochs]
        return [max(r[s] for r in rows) for s in range(self.num_stages)]


def run_label(config: dict[str, Any]) -> str:
    """The method, and λ when it was set or is in effect (intermediate backward)."""
    method = str(config.get("method", "?"))
    resolved = config.get("resolved") or {}
    decay = config.get("decay")
    if decay is None and resolved.get("backward") == "intermediate":
        decay = resolved.get("decay")
    return method if decay is None else f"{method} λ={float(decay):g}"


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Read one run directory; ConfigError when it is not a run or has no finished epoch."""
    run_dir = Path(path)
    cfg_file = run_dir / "config.json"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    if not cfg_file.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.json): give directories "
            "written by timeprest train or timeprest compare"
        )
    config = read_json(cfg_file)
    epochs = read_epochs(run_dir)  # a row another program wrote fails here, naming its gaps
    if not epochs:
        raise ConfigError(f"{run_dir} has no finished epoch yet (epochs.jsonl is missing or empty)")
    return RunData(run_dir, config, epochs, run_label(config))


def expand_run_dirs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Run directories, with a compare output directory replaced by the runs inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "config.json").exists():
            inner = sorted(d for d in p.iterdir() if (d / "config.json").is_file())
            # compare's order (results.json) keeps the colours of its own figures
            order = _compare_order(p)
            inner.sort(key=lambda d: order.get(d.name, len(order)))
            # a method that diverged in its first epoch has nothing to draw: leave it
            # out, unless no run has anything (then load_run says why)
            drawable = [d for d in inner if read_epochs(d)]
            if inner:
                out += drawable or inner
                continue
        out.append(p)  # load_run says what is wrong with it
    return out


def _compare_order(out_dir: Path) -> dict[str, int]:
    try:
        rows = json.loads((out_dir / "results.json").read_text())
        return {Path(r["run_dir"]).name: i for i, r in enumerate(rows)}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> list[RunData]:
    """Load the runs; labels are made unique by the directory name where methods repeat."""
    if not paths:
        raise ConfigError("no run directory given")
    runs = [load_run(p) for p in expand_run_dirs(paths)]
    _make_unique(runs, lambda i, r: f"{r.label} ({r.path.name})")
    _make_unique(runs, lambda i, r: f"{r.label} [{i + 1}]")  # same dir names in other parents
    return runs


def _make_unique(runs: list[RunData], relabel: Callable[[int, RunData], str]) -> None:
    counts = Counter(r.label for r in runs)
    for i, run in enumerate(runs):
        if counts[run.label] > 1:
            run.label = relabel(i, run)


def plot_runs(
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """Draw the figures of the runs in ``paths`` into ``out_dir``; return the files written."""
    runs = load_runs(paths)
    if labels is not None:
        if len(labels) != len(runs):
            raise ConfigError(f"{len(labels)} labels for {len(runs)} runs")
        for run, label in zip(runs, labels):
            run.label = label
        _make_unique(runs, lambda i, r: f"{r.label} ({r.path.name})")
    figure_cls = _figure_class()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subtitle = _common_settings(runs)
    written = []
    figures = [
        ("accuracy.png", _draw_accuracy),
        ("loss.png", _draw_loss),
        ("memory.png", _draw_memory),
        ("staleness.png", _draw_staleness),
    ]
    if all(e.test_bits_per_byte is not None for run in runs for e in run.epochs):
        # language models: validation bits per byte instead of a classification accuracy
        figures[0] = ("bits_per_byte.png", _draw_bits_per_byte)
    for name, draw in figures:
        fig = figure_cls(figsize=(11, 4.2), layout="constrained")
        draw(fig, runs)
        if subtitle:
            fig.suptitle(subtitle, fontsize=10)
        path = out / name
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install timeprest[plot]") from None
    return Figure


def _common_settings(runs: list[RunData]) -> str:
    """A line naming what all runs share (model, data, W, batch), so titles stay short."""
    shared = {}
    for key in ("model", "dataset", "stages", "batch_size"):
        values = {json.dumps(r.config.get(key)) for r in runs}
        if len(values) == 1 and runs[0].config.get(key) is not None:
            shared[key] = runs[0].config[key]
    head = " on ".join(str(shared[k]) for k in ("model", "dataset") if k in shared)
    tail = [f"W={shared['stages']} stages"] if "stages" in shared else []
    tail += [f"batch {shared['batch_size']}"] if "batch_size" in shared else []
    return ", ".join(filter(None, [head, *tail]))


def _color(i: int) -> str:
    return f"C{i % 10}"


def _curves(
    fig: Figure,
    runs: list[RunData],
    key: str,
    ylabel: str,
    scale: float,
    *,
    log_if_wide: bool = False,
) -> None:
    ax_e, ax_t = fig.subplots(1, 2)
    values = []
    for i, run in enumerate(runs):
        epochs = [e.epoch for e in run.epochs]
        wall = [e.wall_time for e in run.epochs]
        ys = [getattr(e, key) * scale for e in run.epochs]
        values += ys
        # markers: a one-epoch run is a single point and must still show
        ax_e.plot(epochs, ys, marker="o", color=_color(i), label=run.label)
        ax_t.plot(wall, ys, marker="o", color=_color(i), label=run.label)
    title = ylabel
    # a diverging run's loss is orders of magnitude above the others: a linear
    # axis would flatten every other curve onto zero
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if log_if_wide and finite and max(finite) > 20 * min(finite):
        for ax in (ax_e, ax_t):
            ax.set_yscale("log")
        ylabel += ", log scale"
    ax_e.set_xlabel("epoch")
    ax_t.set_xlabel("wall time (s, training + evaluation)")
    for ax in (ax_e, ax_t):
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_e.xaxis.get_major_locator().set_params(integer=True)
    ax_e.set_title(f"{title} per epoch")
    ax_t.set_title(f"{title} against wall time")
    ax_t.legend(fontsize=8, loc="best")


def _draw_accuracy(fig: Figure, runs: list[RunData]) -> None:
    _curves(fig, runs, "test_accuracy", "test accuracy (%)", 100.0)


def _draw_bits_per_byte(fig: Figure, runs: list[RunData]) -> None:
    _curves(fig, runs, "test_bits_per_byte", "validation bits per byte", 1.0, log_if_wide=True)


def _draw_loss(fig: Figure, runs: list[RunData]) -> None:
    _curves(fig, runs, "train_loss", "train loss (cross-entropy)", 1.0, log_if_wide=True)


def _bars(
    ax: Axes,
    runs: list[RunData],
    values: list[list[float]],
    ylabel: str,
    title: str,
    value_fmt: str = "{:.3g}",
    log_scale: bool = False,
) -> None:
    """One group of bars per stage, one bar per run."""
    width = 0.8 / len(runs)
    num_stages = max(len(v) for v in values)
    # beyond three bars a group is too narrow for horizontal value labels
    rotation = 90 if len(runs) > 3 else 0
    for i, (run, vals) in enumerate(zip(runs, values)):
        xs = [s - 0.4 + width * (i + 0.5) for s in range(len(vals))]
        bars = ax.bar(xs, vals, width=width, color=_color(i), label=run.label)
        # values on the bars: a zero bar is invisible without its label
        ax.bar_label(bars, fmt=value_fmt, fontsize=7, padding=1, rotation=rotation)
    ax.set_xticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if log_scale:
        ax.set_yscale("log")
    ax.margins(y=0.25 if rotation else 0.12)  # room for the value labels


def _draw_memory(fig: Figure, runs: list[RunData]) -> None:
    ax_v, ax_b = fig.subplots(1, 2)
    versions = [r.stage_peak("peak_versions") for r in runs]
    _bars(
        ax_v,
        runs,
        versions,
        "weight versions (count)",
        "peak weight versions held per stage",
        value_fmt="{:.0f}",
    )
    ax_v.yaxis.get_major_locator().set_params(integer=True)
    raw = [r.stage_peak("peak_weight_bytes") for r in runs]
    unit, div = _byte_unit(max(max(v) for v in raw))
    scaled = [[b / div for b in v] for v in raw]
    # one stage holding most of the weights (a big classifier layer) flattens the
    # others to nothing on a linear axis
    positive = [b for v in scaled for b in v if b > 0]
    log_scale = bool(positive) and max(positive) > 30 * min(positive)
    ylabel = f"peak weight memory ({unit}{', log scale' if log_scale else ''})"
    _bars(ax_b, runs, scaled, ylabel, "peak weight bytes per stage", log_scale=log_scale)
    ax_b.legend(fontsize=8, loc="best")


def _draw_staleness(fig: Figure, runs: list[RunData]) -> None:
    ax_d, ax_r = fig.subplots(1, 2)
    _bars(
        ax_d,
        runs,
        [r.stage_mean("mean_staleness") for r in runs],
        "mean staleness d = k − v (updates)",
        "mean degree of staleness per stage",
    )
    _bars(
        ax_r,
        runs,
        [r.stage_mean("mean_relative_distance") for r in runs],
        "‖w_backward − w_latest‖ / ‖w_latest‖",
        "mean relative distance of backward weights",
    )
    ax_r.legend(fontsize=8, loc="best")


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, div in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if largest >= div:
            return unit, div
    return "bytes", 1.0


def format_bytes(n: float) -> str:
    """``2411520`` -> ``'2.30 MiB'``: short, for tables."""
    unit, div = _byte_unit(n)
    return f"{int(n)} B" if unit == "bytes" else f"{n / div:.2f} {unit}"
