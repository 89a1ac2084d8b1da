"""Memory, where the operating system tells it: this process's resident set, and what is free;
and the C library's one setting that decides whether freed memory leaves the process.

Linux's /proc/self/status gives the resident set now (VmRSS) and its high-water mark (VmHWM),
/proc/meminfo and the cgroup files what a first-use export may take. Elsewhere (macOS, Windows) a
figure that cannot be read is None or NaN, "unknown" (or no limit, for what is free), and nothing
fails: the server's /health and the benchmarks report memory, they never depend on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

from qasr.errors import UsageError

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def status_kb(field: str) -> int | None:
    """One kB field of /proc/self/status (VmRSS, VmHWM), or None where /proc has no such field."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def rss_gb() -> float:
    """Resident memory now (VmRSS): what a long stream must keep flat; NaN where unknown."""
    now = status_kb("VmRSS")
    return now / 1e6 if now is not None else float("nan")


def peak_rss_gb() -> float:
    """Peak resident memory. On Linux the high-water mark of this process's own address space
    (VmHWM): ru_maxrss also carries the parent's peak across fork and exec, so a worker spawned
    after the parent exported a bundle would report the export's 20 GB. Elsewhere ru_maxrss
    (kB on Linux, bytes on macOS), and NaN where neither exists (Windows)."""
    peak = status_kb("VmHWM")
    if peak is not None:
        return peak / 1e6
    try:
        import resource
    except ImportError:
        return float("nan")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1e9 if sys.platform == "darwin" else maxrss / 1e6


def available_memory() -> int:
    """Memory this process can use: MemAvailable, or the cgroup's limit less its use when lower, or
    QASR_MEMORY_GB when set (say, to leave room for other work on a shared machine)."""
    if os.environ.get("QASR_MEMORY_GB"):
        try:
            return int(float(os.environ["QASR_MEMORY_GB"]) * (1 << 30))
        except ValueError:
            raise UsageError(f"QASR_MEMORY_GB={os.environ['QASR_MEMORY_GB']!r}: not a number of GB") from None
    figures = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        figures.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            figures.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(figures) if figures else sys.maxsize


@functools.cache  # a process-wide setting: once (finding the C library runs ldconfig)
def return_freed_memory() -> None:
    """Have every allocation of 1 MB or more mapped on its own, so that freed memory leaves the
    process at once.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), after which
    blocks of a few MB come from the heap, whose freed middle stays resident: reading a 0.6B
    checkpoint tensor by tensor then kept 1.4 GB that nothing used (the exporter), and ONNX Runtime
    graphs run without its arena (the audio encoder) kept their largest activations after the call.
    A fixed threshold (as MALLOC_MMAP_THRESHOLD_ sets) stops that. No-op where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def gb(size: int) -> str:
    return f"{size / (1 << 30):.1f} GB"
