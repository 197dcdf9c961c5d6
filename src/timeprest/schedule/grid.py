"""Stage x time-unit grids of a timeline, for people and for JSON output."""

from __future__ import annotations

import math

from timeprest.schedule.replay import Timeline


def grid_cells(timeline: Timeline) -> list[list[str | None]]:
    """One row per stage, one entry per time unit: the action's text, or None when idle.

    An action is repeated over every unit it lasts; zero-time actions (``U``)
    do not appear. Times are rounded to whole units, so this is meant for
    integer costs (``default`` or ``paper``).
    """
    span = int(math.ceil(timeline.makespan - 1e-9))
    rows: list[list[str | None]] = []
    for row in timeline.stages:
        cells: list[str | None] = [None] * span
        for slot in row:
            a, b = int(round(slot.start)), int(round(slot.end))
            for u in range(a, b):
                cells[u] = str(slot.action)
        rows.append(cells)
    return rows


def format_grid(timeline: Timeline, *, max_units: int | None = None) -> str:
    """A text table: a header of time units, then ``stage s | F0.0 F0.1 B0 ...``; idle is ``-``."""
    cells = grid_cells(timeline)
    if max_units is not None:
        cells = [row[:max_units] for row in cells]
    width = max([len(c) for row in cells for c in row if c] + [2])
    span = len(cells[0]) if cells else 0
    label = f"stage {len(cells) - 1}"
    lines = [" " * len(label) + " | " + " ".join(f"{u:<{width}}" for u in range(span)).rstrip()]
    for s, row in enumerate(cells):
        body = " ".join(f"{(c or '-'):<{width}}" for c in row).rstrip()
        lines.append(f"{f'stage {s}':<{len(label)}} | {body}")
    return "\n".join(lines)
