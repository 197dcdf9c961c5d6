"""files.py: the run directory's JSON files (atomic writes, one-line errors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from timeprest.errors import ConfigError
from timeprest.files import read_json, write_json


def test_write_then_read_round_trips(tmp_path):
    f = tmp_path / "config.json"
    write_json(f, {"method": "gpipe", "stages": [1, 2], "path": Path("/x")})
    assert read_json(f) == {"method": "gpipe", "stages": [1, 2], "path": "/x"}  # str() fallback
    assert f.read_text().endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    f = tmp_path / "progress.json"
    write_json(f, {"epoch": 1})

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_json(f, {"epoch": 2, "big": list(range(1000))})
    assert json.loads(f.read_text()) == {"epoch": 1}


@pytest.mark.parametrize("content", [None, "", '{"epoch": 1', "not json"])
def test_missing_or_corrupt_files_are_one_config_error_line_with_the_hint(tmp_path, content):
    f = tmp_path / "config.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_json(f, "pass --overwrite to start afresh")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{f} is unreadable: ")
    assert msg.endswith("; pass --overwrite to start afresh")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(ConfigError) as err:
        read_json(f)
    # without a hint the line ends with the reason itself
    assert "overwrite" not in str(err.value) and not str(err.value).rstrip().endswith(";")
