"""Progress lines: what a long step is doing, on stderr, so stdout stays the transcript."""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[str], None]


def say(line: str) -> None:
    print(f"qasr: {line}", file=sys.stderr, flush=True)
