"""qasr's cache on disk: where it is, its locks, and the folders a step may write.

The model cache (first-use exports), the digest memo and the derived graphs all meet the same
needs: a place this user may write, checked before work is spent, and a lock that two processes
honour and that dies with its holder. Nothing here knows about models or graphs, so the exporter,
the runtime and the backends all build on it (qasr.models.digest keeps its memo here too).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from qasr.errors import UsageError
from qasr.progress import Progress


def cache_dir() -> Path:
    """$QASR_CACHE, else $XDG_CACHE_HOME/qasr, else ~/.cache/qasr."""
    if os.environ.get("QASR_CACHE"):
        return Path(os.environ["QASR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "qasr"


@contextmanager
def locked(path: Path, progress: Progress, waiting: str) -> Iterator[None]:
    """An exclusive lock on `path`, saying so while waiting. filelock takes flock on Unix and
    msvcrt's lock on Windows; either is released by the operating system if the holder dies."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"{waiting}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def writable_dir(path: Path, what: str) -> Path:
    """`path` as a directory this process can write into, created if need be; else one line saying why.

    Checked before any work is spent, so that an hour of transcription is never lost to a
    mistyped output directory at the end.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: {what} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".qasr-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot use it as {what} ({exc.strerror or exc})") from None
    return path
