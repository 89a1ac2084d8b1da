"""This process's resident memory, where the operating system tells it.

Linux's /proc/self/status gives the resident set now (VmRSS) and its high-water mark (VmHWM).
Elsewhere (macOS, Windows) a figure that cannot be read is None or NaN, "unknown", and nothing
fails: the server's /health and the benchmarks report memory, they never depend on it.
"""

from __future__ import annotations

from pathlib import Path


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
        import sys
    except ImportError:
        return float("nan")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1e9 if sys.platform == "darwin" else maxrss / 1e6
