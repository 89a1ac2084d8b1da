"""Prepacked copies of a bundle's graphs, for a faster cold start on the CPU that made them.

ONNX Runtime repacks every constant weight of a MatMul / MatMulNBits / Conv into its kernels' own
layout when a session opens, and optimises the graph: most of a session's seconds. It can save the
optimised graph with the packed weights in its external data file
(`session.save_external_prepacked_constant_initializers`); a session opened on that copy, with
graph optimisation off, maps them instead of packing them again. The packed layout depends on the
CPU's instruction set and on the ONNX Runtime version, so the copies live in BUNDLE/prepacked/
with a record of both, and the backend uses them only where the record matches; anywhere else it
opens the portable graphs. Measured (docs/benchmarks.md, "Quantized weights"): every weight ready
in less than half the time, for about twice the graphs' bytes again on disk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from qasr.cpu import cpu_info
from qasr.jsonfile import read_record
from qasr.runtime.bundle import PREPACKED, PREPACKED_RECORD, Bundle, staged


def packing_key() -> dict[str, str]:
    """What the packed layout depends on: ONNX Runtime's version and the CPU's model and features."""
    cpu, flags = cpu_info()
    return {"onnxruntime": ort.__version__, "cpu": cpu,
            "features": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]}


def prepacked_graph(bundle: Bundle, name: str) -> Path | None:
    """The prepacked copy of graph `name`, when one was made on this kind of machine for this bundle."""
    folder = bundle.path / PREPACKED
    record = read_record(folder / PREPACKED_RECORD)
    if record is None:
        return None
    current = record.get("machine") == packing_key() and record.get("source_sha256") == _bundle_key(bundle)
    path = folder / bundle.manifest["graphs"][name]["file"]
    return path if current and name in record.get("graphs", []) and path.is_file() else None


def write_prepacked(bundle: Bundle, options: Callable[[], ort.SessionOptions],
                    progress: Callable[[str], None] = print) -> Path:
    """Write BUNDLE/prepacked/ (every graph, optimised and packed for this machine), staged and moved
    into place when complete. `options` gives the session options the backend itself uses."""
    out = bundle.path / PREPACKED
    with staged(out) as staging:
        for name, entry in bundle.manifest["graphs"].items():
            progress(f"prepacking {name}")
            settings = options()
            settings.optimized_model_filepath = str(staging / entry["file"])
            for key, value in (("session.optimized_model_external_initializers_file_name", entry["file"] + ".data"),
                               ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
                               ("session.save_external_prepacked_constant_initializers", "1")):
                settings.add_session_config_entry(key, value)
            settings.log_severity_level = 3  # its warning that the copy is for this machine: we know
            ort.InferenceSession(str(bundle.graph_path(name)), settings, providers=["CPUExecutionProvider"])
        record = {"machine": packing_key(), "source_sha256": _bundle_key(bundle), "graphs": list(bundle.manifest["graphs"])}
        (staging / PREPACKED_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return out


def _bundle_key(bundle: Bundle) -> str:
    """The manifest's digest: a re-export or re-quantization into the same directory invalidates the copies."""
    return hashlib.sha256((bundle.path / "manifest.json").read_bytes()).hexdigest()
