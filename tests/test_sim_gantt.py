"""sim/gantt.py: the Gantt chart with its memory panel."""

from __future__ import annotations

import struct
import sys

import pytest

from sim_cases import sim, sized
from timeprest.errors import ConfigError


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_gantt_png(tmp_path):
    pytest.importorskip("matplotlib")
    from timeprest.sim.gantt import draw_gantt

    out = tmp_path / "g.png"
    draw_gantt(sim("i-timeprest", 3, 3, 4, sized(3)), out)
    wpx, hpx = _png_size(out)
    assert wpx > hpx > 100
    # without sizes the lower panel shows versions; still a picture
    draw_gantt(sim("pipedream", 3, 1, 6), tmp_path / "p.png")
    assert _png_size(tmp_path / "p.png")[0] > 100


def test_gantt_to_an_unwritable_path_is_a_config_error(tmp_path):
    pytest.importorskip("matplotlib")
    from timeprest.sim.gantt import draw_gantt

    with pytest.raises(ConfigError, match="cannot write"):
        draw_gantt(sim("gpipe", 2, 2, 2), tmp_path / "missing" / "x.png")


def test_gantt_without_matplotlib_is_a_config_error(monkeypatch, tmp_path):
    from timeprest.sim.gantt import draw_gantt

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match=r"pip install timeprest\[plot\]"):
        draw_gantt(sim("gpipe", 2, 2, 2), tmp_path / "x.png")
