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
    raise _unreadable(path, why, hint) from None


def read_json_object(path: Path, keys: tuple[str, ...] = (), hint: str = "") -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object with ``keys``."""
    data = read_json(path, hint)
    if not isinstance(data, dict):
        raise _unreadable(path, "not a JSON object", hint)
    for k in keys:
        if k not in data:
            raise _unreadable(path, f"no {k!r}", hint)
    return data


def _unreadable(path: Path, why: str, hint: str) -> ConfigError:
    return ConfigError(f"{path} is unreadable: {why}" + (f"; {hint}" if hint else ""))


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a crash never leaves half a file in the run dir."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
