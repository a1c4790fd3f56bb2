"""Reading the JSON files of checkpoints and plans, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Any, who: str, missing_ok: bool = False) -> Any:
    """The JSON object (dict) in `path`; `who` prefixes the messages. Raises
    FileNotFoundError when it does not exist (or returns None with missing_ok) and
    ValueError when it is not valid UTF-8 JSON or not an object."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{who}: {p} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{who}: {p} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{who}: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{who}: {p} must hold a JSON object, got {type(data).__name__}")
    return data
