"""What every benchmark shares: the random full-size checkpoints and their bundles, speech of a
given length, the machine's description and its memory bandwidth, and the bytes a decode step reads.

Full-size random checkpoints of the released shapes (generated once into a cache directory
outside the repository) have the real models' speed and memory; random weights decide nothing,
so generation is forced to a set number of tokens wherever speed is measured.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime
import soundfile as sf

from qasr.cpu import cpu_info, widest_simd
from qasr.errors import QasrError
from qasr.export.onnx_export import export_bundle
from qasr.models.checkpoint import parameter_counts
from qasr.models.config import parse_config
from qasr.models.synthetic import PRESETS, make_checkpoint, official_config
from qasr.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path(os.environ.get("QASR_BENCH_CACHE", "~/.cache/qasr-bench")).expanduser()


def prepare(preset: str, cache: Path) -> tuple[Path, Path]:
    """The random checkpoint and its bundle, made once and reused from the cache."""
    checkpoint, bundle = cache / f"qwen3-asr-{preset}", cache / f"qwen3-asr-{preset}-bundle"
    if not (checkpoint / "config.json").is_file():
        print(f"generating {checkpoint}", file=sys.stderr)
        make_checkpoint(checkpoint, preset, seed=0)
    try:
        Bundle.load(bundle)
    except QasrError:  # missing, or written in an older bundle format: export it (again)
        export_bundle(checkpoint, bundle, progress=lambda line: print(line, file=sys.stderr))
    return checkpoint, bundle


def speech_file(cache: Path, seconds: float) -> Path:
    """Real speech of that length: the test recordings (16 kHz) in turn, written once as a wav."""
    path = cache / f"speech-{seconds:g}s.wav"
    if not path.is_file():
        clips = [sf.read(ROOT / "tests" / "data" / name, dtype="float32")[0]
                 for name in ("en_16k_s16.wav", "zh_16k_f32_loud.wav")]
        clips = [c / max(1.0, float(np.abs(c).max())) for c in clips]
        reps = int(seconds * 16000 // sum(map(len, clips))) + 1
        sf.write(path, np.concatenate(clips * reps)[: int(seconds * 16000)], 16000, subtype="PCM_16")
    return path


def measure_bandwidth(threads: int, gigabytes: float = 1.0) -> float:
    """Read bandwidth in GB/s: the best of ten threaded reductions (sum, max) over 1 GB.

    The best, because on a shared machine every disturbance only makes a run slower, and the
    floor must not be set by a disturbed run.
    """
    data = np.ones(int(gigabytes * 1e9 / 4), dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for reduce in (np.sum, np.max) * 5:
            began = time.perf_counter()
            list(pool.map(reduce, parts))
            best = min(best, time.perf_counter() - began)
    return data.nbytes / best / 1e9


def bytes_per_token(preset: str, weight_bytes: int, cache_bytes: int, context: int) -> float:
    """Bytes one decode step must read: decoder layers, final norm and head, plus the KV cache."""
    config = parse_config(official_config(PRESETS[preset]))
    counts = parameter_counts(config)
    head = counts["head"] or counts["embedding"]  # a tied head reads the embedding table
    t = config.text
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context
    return weight_bytes * (counts["decoder"] + head) + cache_bytes * kv


def describe_machine() -> str:
    """CPU model, cores, memory, load, and the versions that matter, in one line."""
    cpu, flags = cpu_info()
    cpu += f" ({widest_simd(flags)})"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    try:
        import torch
        import transformers

        versions += [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    except ImportError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB (load average at start {load}); {', '.join(versions)}"
