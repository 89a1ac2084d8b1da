"""What CPU this is: its model name and feature flags, from /proc/cpuinfo where Linux has it.

The prepacked graphs are keyed by them (their packed layout depends on the CPU's features) and
every benchmark names the widest vector extension beside its figures (machines sold under one
name differ 2x in matmul speed with it).
"""

from __future__ import annotations

import platform
from pathlib import Path

SIMD = (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2"),
        ("sve", "SVE"), ("asimddp", "NEON dot product"), ("asimd", "NEON"))


def cpu_info() -> tuple[str, list[str]]:
    """(model name, feature flags) of the first CPU; the platform's names and no flags where
    /proc/cpuinfo is missing (macOS, Windows)."""
    model, flags = "", []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        model = model or (value.strip() if key.strip() == "model name" else "")
        flags = flags or (value.split() if key.strip() in ("flags", "Features") else [])
    return model or platform.processor() or platform.machine(), flags


def widest_simd(flags: list[str]) -> str:
    """The vector extension that sets MLAS's int8 and fp32 kernels."""
    return next((name for flag, name in SIMD if flag in flags), "no AVX2 or NEON")
