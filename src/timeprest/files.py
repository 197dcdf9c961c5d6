"""Reading and writing the JSON files of a run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from timeprest.errors import ConfigError


def read_json(path: Path, hint: str = "") -> Any:
    """The parsed file; a missing, unreadable or invalid file is one ConfigError line.

    ``hint`` (what the user can do about it) is appended after a semicolon.
    """
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}" + (f"; {hint}" if hint else "")) from None


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a crash never leaves half a file in the run dir."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
