"""Reading the small JSON files qasr keeps (manifests, configs, records), with one rule each for a
file that must be there and one that may not be there yet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qasr.errors import QasrError


def read_json(path: Path, error: type[QasrError], hint: str = "") -> Any:
    """The JSON in `path`, or `error` in one line naming the file and what is wrong (then `hint`)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}){hint}") from None


def read_record(path: Path) -> Any | None:
    """The JSON in `path`, or None where it is missing or unreadable: a record that a complete piece
    of work writes last, so that its absence means the work must be done (again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
