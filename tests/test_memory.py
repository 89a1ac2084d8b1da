"""What a loaded model keeps resident: pages of the bundle's files that only duplicate packed weights
are given back (qasr.memory.drop_file_pages), also while a session is still being made
(qasr.memory.dropping_file_pages), without changing a value read through them."""

from __future__ import annotations

import gc
import mmap
import time
from pathlib import Path

import numpy as np
import pytest

from qasr import memory
from qasr.memory import drop_file_pages, dropping_file_pages

EN = Path(__file__).parent / "data" / "en_16k_s16.wav"
pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")


def resident(path: Path) -> int:
    """Bytes of `path` resident in this process through its mappings (smaps' Rss)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) > 5 and " ".join(fields[5:]) == str(path.resolve())
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_clean_private_pages_leave_and_read_the_same(tmp_path):
    """A read-only private mapping's pages leave the resident set and read back the file's values;
    a mapping the process wrote to keeps its pages and its writes; other files are not touched."""
    values = np.arange(1 << 20, dtype=np.float32)
    read, written, other = (tmp_path / name for name in ("read.bin", "written.bin", "other.bin"))
    for path in (read, written, other):
        values.tofile(path)
    maps = {path: np.memmap(path, dtype=np.float32, mode="c") for path in (read, written, other)}
    maps[written][5] = -1.0  # a copy-on-write page now: this process's own data
    sums = {path: float(array.sum()) for path, array in maps.items()}  # every page resident
    assert all(resident(path) >= values.nbytes for path in maps)

    dropped = drop_file_pages([read, written])

    assert dropped >= values.nbytes and resident(read) == 0
    assert resident(written) >= values.nbytes and maps[written][5] == -1.0
    assert resident(other) >= values.nbytes
    assert {path: float(array.sum()) for path, array in maps.items()} == sums
    assert drop_file_pages([tmp_path / "absent.bin"]) == 0


def test_shared_mappings_are_left_alone(tmp_path):
    """A shared mapping's pages are the file's own (writes reach it): only private ones are dropped."""
    path = tmp_path / "shared.bin"
    path.write_bytes(bytes(1 << 20))
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as shared:
        shared[0] = 7
        assert drop_file_pages([path]) == 0 and shared[0] == 7 and resident(path) > 0


def test_pages_leave_while_the_block_runs_and_at_its_end(tmp_path):
    """Pages read inside the block leave without waiting for its end (what ONNX Runtime maps while
    it packs a decoder), and those read last leave when it ends; the values read stay the file's."""
    values = np.arange(1 << 20, dtype=np.float32)
    path = tmp_path / "weights.bin"
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="c")
    with dropping_file_pages([path], every=0.01):
        assert float(mapped.sum()) == float(values.sum())
        deadline = time.monotonic() + 60  # a liveness bound for a busy machine, not a timing goal
        while resident(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident(path) == 0
        assert float(mapped[::1024].sum()) == float(values[::1024].sum())  # read back from the file
    assert resident(path) == 0


def test_only_at_the_end_leaves_pages_alone_while_the_block_runs(tmp_path):
    """every=None (an fp32 graph's load, which keeps no pages for nothing): pages stay in the page
    cache while the block runs, and what is still mapped at its end leaves."""
    path = tmp_path / "weights.bin"
    np.arange(1 << 20, dtype=np.float32).tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="c")
    with dropping_file_pages([path], every=None):
        mapped.sum()
        time.sleep(0.05)
        assert resident(path) > 0
    assert resident(path) == 0


def test_a_loaded_quantized_model_keeps_no_file_pages_and_decodes_the_same(fused, monkeypatch):
    """ONNX Runtime keeps each MatMulNBits' scales and zero points mapped from the data file beside the
    packed weight holding them too; the CPU backend drops those pages once a session is made. The ids
    are those of a model that keeps them."""
    from qasr.runtime.bundle import Bundle
    from qasr.runtime.transcribe import Transcriber

    bundle = Path(fused("int4"))
    data = [bundle / file for entry in Bundle.load(bundle).manifest["graphs"].values() for file in entry["data"]]
    with monkeypatch.context() as patch:
        patch.setattr(memory, "drop_file_pages", lambda files: 0)
        kept = Transcriber.load(bundle, backend="onnxruntime")
        kept.backend.sessions["decoder"]
        held = sum(resident(path) for path in data)
        assert held > 0
        ids = kept.transcribe(EN, max_new_tokens=6).token_ids
        del kept
        gc.collect()  # its sessions unmap the files: a page mapped twice is not reclaimed
    model = Transcriber.load(bundle, backend="onnxruntime")
    model.backend.sessions["decoder"]
    assert sum(resident(path) for path in data) < held / 10
    assert model.transcribe(EN, max_new_tokens=6).token_ids == ids


def test_a_staged_bundle_reaches_the_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """staged() flushes every file and folder it wrote before moving the folder into place (so the
    pages are clean, and reclaimable, when a model maps them; and a power cut leaves no empty files)."""
    import os

    from qasr.runtime import bundle

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(bundle.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    out = tmp_path / "out"
    with bundle.staged(out) as staging:
        (staging / "graph.onnx").write_bytes(b"x")
        (staging / "sub").mkdir()
        (staging / "sub" / "data").write_bytes(b"y")
        assert not out.exists()
    names = {Path(name).name for name in synced}
    assert {"graph.onnx", "data", "sub"} <= names and staging.name in names
    assert (out / "sub" / "data").read_bytes() == b"y"
