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
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except (OSError, json.JSONDecodeError) as exc:
        why = str(exc)
    raise ConfigError(f"{path} is unreadable: {why}" + (f"; {hint}" if hint else "")) from None


def read_json_object(path: Path, keys: tuple[str, ...] = (), hint: str = "") -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object with ``keys``."""
    data = read_json(path, hint)
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else None
    if missing is None or missing:
        what = f"no {missing[0]!r}" if missing else "not a JSON object"
        raise ConfigError(f"{path} is unreadable: {what}" + (f"; {hint}" if hint else ""))
    return data


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a crash never leaves half a file in the run dir."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
