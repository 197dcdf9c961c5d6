"""schedule/grid.py: stage x time-unit grids of a timeline."""

from __future__ import annotations

from timeprest.schedule import build_schedule, format_grid, grid_cells


def test_grid_cells_repeat_an_action_over_its_duration():
    s = build_schedule("nf1b", 2, 2, 2)
    cells = grid_cells(s.timeline())
    row0 = cells[0]
    assert row0[:2] == ["F0.0", "F0.1"]
    b0 = [c for c in row0 if c == "B0"]
    assert len(b0) == 4  # B{t} lasts N * 2 units
    assert all(c is None or not c.startswith("U") for r in cells for c in r)


def test_format_grid_marks_idle_and_cuts_at_max_units():
    s = build_schedule("gpipe", 2, 1, 1)
    # F at stage 0 [0,1), stage 1 [1,2); B at stage 1 [2,4), stage 0 [4,6)
    lines = format_grid(s.timeline()).splitlines()
    assert lines[1].split("|")[1].split() == ["F0.0", "-", "-", "-", "B0.0", "B0.0"]
    assert lines[2].split("|")[1].split() == ["-", "F0.0", "B0.0", "B0.0", "-", "-"]
    assert lines[0].split("|")[1].split() == ["0", "1", "2", "3", "4", "5"]
    short = format_grid(s.timeline(), max_units=2).splitlines()
    assert short[1].split("|")[1].split() == ["F0.0", "-"]
    assert s.grid() == format_grid(s.timeline())
