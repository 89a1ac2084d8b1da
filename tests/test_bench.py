"""The benchmark's arithmetic and report plumbing (its timings are never asserted: shared machines)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from qasr.bench.docs import write_section
from qasr.bench.harness import bytes_per_token
from qasr.bench.official import BEGIN, END, report
from qasr.cpu import widest_simd


def test_bytes_per_token_match_the_published_floor():
    """The bandwidth floor of docs/benchmarks.md: 1.192 GB (0.6B) and 3.441 GB (1.7B) of bf16 weights a token."""
    assert round(bytes_per_token("0.6b", 2, 2, 0) / 1e9, 3) == 1.192
    assert round(bytes_per_token("1.7b", 2, 2, 0) / 1e9, 3) == 3.441
    kv_per_token = bytes_per_token("0.6b", 2, 2, 1) - bytes_per_token("0.6b", 2, 2, 0)
    assert kv_per_token == 28 * 2 * 8 * 128 * 2  # 112 KiB of bf16 K and V per context token


def test_write_section_replaces_only_its_own_markers(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- frontend:begin -->\nfrontend table\n<!-- frontend:end -->\n")
    write_section(doc, BEGIN, END, "first")
    write_section(doc, BEGIN, END, "second")
    text = doc.read_text()
    assert "frontend table" in text and "second" in text and "first" not in text
    assert text.count(BEGIN) == 1


def test_report_ratios_against_official_fp32():
    run = dict(load=5.0, cold_start=10.0, frontend=0.1, encoder=2.0, ttft=4.0, decode_ms=200.0, rtf=1.0, peak_rss_gb=4.0,
               prompt_tokens=150)
    faster = {**run, "encoder": 1.0, "decode_ms": 100.0}
    rows = [{"model": "0.6b", "seconds": 10, "system": "official-fp32", "runs": [run]},
            {"model": "0.6b", "seconds": 10, "system": "qasr-onnxruntime", "runs": [faster]}]
    args = SimpleNamespace(models=["0.6b"], seconds=[10], repeats=1, threads=2, steps=32, skip=[],
                           systems=["official-fp32", "qasr-onnxruntime"])
    text = report(rows, bandwidth=20.0, args=args)
    qasr_row = next(line for line in text.splitlines() if "| qasr-onnxruntime |" in line and "x" in line)
    assert "1 [1-1] x0.50" in qasr_row and "100 [100-100] x0.50" in qasr_row
    assert "| Jetson AGX Orin | 204.8 |" in text


def test_resident_memory_now_and_at_its_peak():
    """rss_gb follows an allocation (what a long stream's flat memory is judged on); the peak holds it.
    Both are decimal GB: the 64 MiB are 0.0671 GB (the kernel's kB divided by 10^6 read 0.0655).

    Measured in a fresh process of its own, on 64 MiB of fresh anonymous pages, each touched: no
    allocator history (pages freed earlier and reused) and no other thread of the test run can move
    resident memory between the two readings."""
    probe = (
        "import mmap; from qasr.memory import peak_rss_gb, rss_gb\n"
        "before = rss_gb(); block = mmap.mmap(-1, 64 * 2**20)\n"
        "for at in range(0, len(block), 4096): block[at] = 1\n"
        "during = rss_gb(); print(before, during, peak_rss_gb())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    before, during, peak = map(float, done.stdout.split())
    grown_kib = round((during - before) * 1e9 / 1024)  # back to the kernel's whole KiB: a float
    assert grown_kib >= 64 * 2**10 and peak >= during  # difference of GB can fall an ulp short


def test_export_benchmark_worker_loads_only_the_runtime():
    """scripts/bench_export.py's worker is the process whose cold start the benchmark reports, so it
    must start as a user's does: importing the script loads neither torch nor the exporter (the
    harness's imports), whose import would add seconds to that cold start."""
    root = Path(__file__).parent.parent
    probe = ("import sys; sys.path.insert(0, 'scripts'); import bench_export\n"
             "print(sorted({'torch', 'qasr.export.onnx_export', 'qasr.bench.harness'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.stdout.strip() == "[]"


def test_widest_simd_names_what_sets_the_kernels_speed():
    """Machines sold under one name differ by the vector extension; the report names the widest."""
    assert widest_simd("fpu sse2 avx2 avx512f avx512_vnni".split()) == "AVX-512 VNNI"
    assert widest_simd("fpu sse2 avx2 fma".split()) == "AVX2"
    assert widest_simd("fp asimd asimddp sve".split()) == "SVE"
    assert widest_simd([]) == "no AVX2 or NEON"
