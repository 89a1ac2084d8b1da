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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qasr.errors import UsageError

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MADV_PAGEOUT = 21  # Linux (5.4 on) madvise advice: reclaim these pages now


def status_kb(field: str, pid: int | str = "self") -> int | None:
    """One kB field of /proc/PID/status (VmRSS, VmHWM) of this process or another, or None where /proc
    has no such field."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def kb_gb(kb: int) -> float:
    """GB (10^9 bytes) from the kB that Linux reports memory in (/proc's VmRSS and VmHWM, getrusage's
    ru_maxrss, GNU time's "kbytes"), which are KiB: 1,000,000 of them are 1.024 GB, not 1."""
    return kb * 1024 / 1e9


def rss_gb() -> float:
    """Resident memory now (VmRSS), in GB: what a long stream must keep flat; NaN where unknown."""
    now = status_kb("VmRSS")
    return kb_gb(now) if now is not None else float("nan")


def peak_rss_gb() -> float:
    """Peak resident memory. On Linux the high-water mark of this process's own address space
    (VmHWM): ru_maxrss also carries the parent's peak across fork and exec, so a worker spawned
    after the parent exported a bundle would report the export's 20 GB. Elsewhere ru_maxrss
    (kB on Linux, bytes on macOS), and NaN where neither exists (Windows)."""
    peak = status_kb("VmHWM")
    if peak is not None:
        return kb_gb(peak)
    try:
        import resource
    except ImportError:
        return float("nan")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1e9 if sys.platform == "darwin" else kb_gb(maxrss)


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


@functools.cache  # finding the C library runs ldconfig: once
def _glibc() -> ctypes.CDLL | None:
    """The GNU C library of this process, or None (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def drop_file_pages(files: list[Path]) -> int:
    """Take out of this process's resident set the pages it holds of `files` by a private file
    mapping, unchanged since they were read; returns the bytes of mappings asked to leave.

    ONNX Runtime maps each external initializer of a graph from its data file. After it packs a
    MatMulNBits' weight, the scales and zero points stay initializers beside the packed copy that
    holds them too, resident for nothing: 70-90 MB of the 1.7B's int4 decoder data file at the end
    of its load, 12 MB of its int8 encoder's. madvise(MADV_PAGEOUT) (Linux 5.4 on) reclaims such
    pages: the file is unchanged, and a page read again (a row of the embedding table) comes back
    from it. It never discards data, so a mapping that changes meanwhile (another thread unmapping
    it, and the address reused) loses nothing, where MADV_DONTNEED would zero whatever is there by
    then. Pages not yet written back to disk are not reclaimed (bundles are flushed before they are
    moved into place), nor pages another process maps too. A mapping with pages the process wrote
    to (Anonymous in smaps) is left alone. Linux with glibc only; elsewhere, or on an older
    kernel, nothing leaves.
    """
    libc = _glibc()
    try:
        maps = Path("/proc/self/smaps").read_text() if libc is not None else ""
    except OSError:
        return 0
    dropped = 0
    for start, end in _clean_mappings(maps, {os.path.realpath(file) for file in files}):
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT) == 0:
            dropped += end - start
    return dropped


@contextmanager
def dropping_file_pages(files: list[Path], every: float | None = 0.1) -> Iterator[None]:
    """drop_file_pages(files) every `every` seconds while the block runs (a session being made), and
    once at its end (only then where `every` is None).

    ONNX Runtime keeps each packed MatMulNBits' scales and zero points mapped until the whole session
    is made, so a drop at the end alone still lets them all add up first: 52 MB of the 1.7B int4
    decoder's peak while it loads (1.14 GB against 1.09 GB with a drop every 0.1 s, 0.05 s every
    0.05 s), for 0.02-0.08 s more load time, since a page dropped before ONNX Runtime is done with it
    is read again from the disk. Dropped pages leave the page cache too, so the next process reads
    them from the disk: 80 MB of that decoder's file against 57 MB with the drop at the end alone;
    an fp32 graph, which keeps no such pages, would lose 0.6 GB of its file (the 0.6B decoder's) for
    nothing, hence `every=None` for it."""
    if every is None:
        yield
        drop_file_pages(files)
        return
    done = threading.Event()

    def drop_until_done() -> None:
        while not done.wait(every):
            drop_file_pages(files)

    dropper = threading.Thread(target=drop_until_done, name="qasr-drop-pages", daemon=True)
    dropper.start()
    try:
        yield
    finally:
        done.set()
        dropper.join()
        drop_file_pages(files)


def _clean_mappings(smaps: str, wanted: set[str]) -> list[tuple[int, int]]:
    """(start, end) of each private mapping in `smaps` of a file in `wanted` with no written page."""
    found, current = [], None
    for line in smaps.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            private = len(fields) > 5 and fields[1].endswith("p") and " ".join(fields[5:]) in wanted
            current = tuple(int(x, 16) for x in fields[0].split("-")) if private else None
        elif current and fields[:1] == ["Anonymous:"]:
            if fields[1] == "0":
                found.append(current)
            current = None
    return found


@functools.cache  # a process-wide setting: once
def return_freed_memory() -> None:
    """Have every allocation of 1 MB or more mapped on its own, so that freed memory leaves the
    process at once.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), after which
    blocks of a few MB come from the heap, whose freed middle stays resident: reading a 0.6B
    checkpoint tensor by tensor then kept 1.4 GB that nothing used (the exporter), and ONNX Runtime
    graphs run without its arena (the audio encoder) kept their largest activations after the call.
    A fixed threshold (as MALLOC_MMAP_THRESHOLD_ sets) stops that. No-op where the C library is not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def trim_heap() -> None:
    """Give the C library's freed heap pages back to the system now (malloc_trim).

    Parsing the tokenizer.json of the real vocabulary frees many small blocks that stay resident in
    the middle of the heap, where no later allocation of a run needs them, since blocks under the
    mmap threshold are not returned on their own: 17 MB of the 59 MB it holds after the parse (55 MB
    of 105 MB for a file whose merges are two-string lists). No-op where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def gb(size: int) -> str:
    return f"{size / (1 << 30):.1f} GB"
