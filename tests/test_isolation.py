"""qasr.runtime and qasr.kernels stay free of torch, transformers and librosa."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import qasr.kernels
import qasr.runtime

FORBIDDEN = ("torch", "transformers", "librosa")


def test_runtime_imports_no_torch():
    modules = [m.name for m in pkgutil.walk_packages(qasr.runtime.__path__, "qasr.runtime.")]
    modules += [m.name for m in pkgutil.walk_packages(qasr.kernels.__path__, "qasr.kernels.")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"imported by the runtime: {out.strip()}"
    assert "qasr.runtime.backends.onnxruntime_cuda" in modules and "qasr.kernels.fbank" in modules


def test_engine_building_needs_no_torch():
    """Deriving bf16 graphs and building engines runs where only onnx is installed (a Jetson)."""
    code = ("import sys, qasr.export.precision, qasr.export.tensorrt_build, qasr.cli\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
