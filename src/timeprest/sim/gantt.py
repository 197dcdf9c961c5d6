"""Gantt chart of a simulated run: one row per stage, and the memory of each stage under it.

Boxes are labelled with the action and the weight version(s) it reads
(``F3.1 v2``; ``B3 v1+3`` for a backward on an intermediate of versions 1
and 3). Idle time is the grey background between boxes. matplotlib is an
optional extra (``pip install timeprest[plot]``) and is imported only here,
only when a chart is drawn.
"""

from __future__ import annotations

import os
from typing import Any

from timeprest.errors import ConfigError
from timeprest.sim.simulate import SimResult

_FORWARD = "#4c78a8"
_BACKWARD = "#f58518"
_UPDATE = "#222222"
_IDLE = "#e6e6e6"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("drawing a PNG needs matplotlib: pip install timeprest[plot]") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def check_chart_path(path: str | os.PathLike[str], what: str = "") -> None:
    """ConfigError unless ``path`` names a file of a kind matplotlib draws (it picks the
    format from the suffix); without matplotlib, :func:`_pyplot` says what is missing."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        kinds = None
    else:
        kinds = sorted(FigureCanvasBase.get_supported_filetypes())
    if not suffix or (kinds is not None and suffix not in kinds):
        known = f" ({', '.join('.' + k for k in kinds)})" if kinds else ""
        raise ConfigError(
            f"{what}{os.fspath(path)}: name a chart file of a kind matplotlib draws{known}"
        )


def _scale_bytes(peak: float) -> tuple[float, str]:
    for div, unit in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if peak >= div:
            return float(div), unit
    return 1.0, "B"


def draw_gantt(
    result: SimResult,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    width: float | None = None,
    dpi: int = 120,
) -> None:
    """Write the chart of ``result`` to ``path`` (PNG, or any format matplotlib infers)."""
    plt = _pyplot()
    check_chart_path(path)
    w = result.num_stages
    span = result.makespan
    # wide enough that the shortest box can hold a label written upwards
    durations = [sl.end - sl.start for row in result.timeline.stages for sl in row]
    shortest = min((d for d in durations if d > 0), default=span or 1.0)
    fig_w = width if width is not None else min(60.0, max(8.0, 1.5 + 0.22 * span / shortest))
    row_h = 0.9
    fig, (ax, axm) = plt.subplots(
        2,
        1,
        figsize=(fig_w, 1.0 + row_h * w + 2.6),
        sharex=True,
        gridspec_kw={"height_ratios": [row_h * w, 2.6]},
    )
    ax.set_xlim(0, span)
    ax.set_ylim(w - 0.5, -0.5)
    ax.set_yticks(range(w))
    ax.set_yticklabels([f"stage {s}" for s in range(w)])
    for s in range(w):
        ax.barh(s, span, left=0, height=0.8, color=_IDLE, zorder=0)
    inch = span / max(fig_w - 1.5, 1.0)  # data units per inch of the axes, roughly
    for sl, i in result.slots():
        a = sl.action
        if a.is_update:
            ax.plot([sl.start, sl.start], [sl.stage - 0.42, sl.stage + 0.42], color=_UPDATE, lw=1.5)
            if sl.end > sl.start:
                ax.barh(sl.stage, sl.end - sl.start, left=sl.start, height=0.8, color=_UPDATE)
            continue
        color = _FORWARD if a.is_forward else _BACKWARD
        dur = sl.end - sl.start
        ax.barh(sl.stage, dur, left=sl.start, height=0.8, color=color, edgecolor="white", lw=0.8)
        label = result.label(sl.stage, i)
        # about 0.065 inch per character at 7 points
        if dur >= 0.07 * len(label) * inch:
            rotation = 0
        elif dur >= 0.14 * inch:
            rotation = 90
        else:
            continue
        ax.text(
            sl.start + dur / 2,
            sl.stage,
            label,
            ha="center",
            va="center",
            rotation=rotation,
            fontsize=7,
            color="white",
        )
    sc = result.schedule
    ax.set_title(
        title
        or (
            f"{result.method}: {sc.kind}, W={w}, N={sc.num_microbatches}, "
            f"T={sc.num_minibatches}; {result.time_per_minibatch:.3g} s per mini-batch "
            "(labels: action, weight version read; black tick: update)"
        ),
        fontsize=9,
    )
    # memory panel: bytes per stage over time, or versions when no sizes are known
    peaks = [r.memory.peak for r in result.stages]
    if max(peaks, default=0) > 0:
        div, unit = _scale_bytes(max(peaks))
        for r in result.stages:
            axm.step(
                r.memory.times,
                [v / div for v in r.memory.total],
                where="post",
                label=f"stage {r.stage}",
            )
        axm.set_ylabel(f"memory ({unit})")
    else:
        for r in result.stages:
            axm.step(r.memory.times, r.memory.versions, where="post", label=f"stage {r.stage}")
        axm.set_ylabel("weight versions held")
    axm.set_ylim(bottom=0)
    axm.set_xlabel("time (s)")
    axm.legend(loc="upper right", fontsize=7, ncol=w)
    axm.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(os.fspath(path), dpi=dpi)
    except OSError as exc:
        raise ConfigError(f"cannot write {os.fspath(path)!r}: {exc.strerror}") from None
    finally:
        plt.close(fig)
