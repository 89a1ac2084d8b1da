"""Which backend runs a bundle: the list of backends, and `auto`'s choice among them.

Each backend is one module of this folder with a `name`-bearing Backend class and two functions:
`usable(bundle)`, whether `auto` may pick it on this machine for this bundle (cheap, never
raising), and `load(bundle, threads, precision, progress, background_load)`, which opens it or
refuses in one line. Adding a backend means adding its module and one entry to BACKENDS.
Importing them all is safe on any machine: what each needs beyond onnxruntime (cuda-python,
TensorRT) is imported when it is used.
"""

from __future__ import annotations

from types import ModuleType

from qasr.errors import UsageError
from qasr.progress import Progress, say
from qasr.runtime.backends import (onnxruntime_cpu, onnxruntime_cuda, onnxruntime_cuda_fused, onnxruntime_fused,
                                  tensorrt_engines)
from qasr.runtime.backends.interface import PRECISIONS, Backend
from qasr.runtime.bundle import Bundle

# name -> module, in the order `auto` tries them: TensorRT's engines where the bundle has them and
# TensorRT is installed, then ONNX Runtime on a CUDA device, then ONNX Runtime on the CPU.
BACKENDS: dict[str, ModuleType] = {
    "tensorrt": tensorrt_engines,
    "onnxruntime-cuda": onnxruntime_cuda,
    "onnxruntime": onnxruntime_cpu,
}
CHOICES = ("auto", *BACKENDS)  # what --backend takes


def open_backend(bundle: Bundle, backend: str = "auto", threads: int | None = None, precision: str = "auto",
                 progress: Progress | None = None, background_load: bool = True) -> Backend:
    """Open `backend` on `bundle` (auto: the first usable one of BACKENDS).

    `precision` is the GPU's compute type: TensorRT's engines have theirs from `qasr build`; on
    onnxruntime-cuda, fp16 and bf16 graphs are derived from the fp32 ones on first use and kept in
    the bundle (auto: an fp32 bundle's fp16 graphs). The CPU runs the bundle's graphs only, and a
    fused decoder (one cache slot per batch row) has a contract only the ONNX Runtime backends bind.
    `background_load`: the decoder (or aligner) loads in the background while the audio is encoded,
    else on first use (qasr.runtime.backends.onnxruntime_cpu.Sessions)."""
    if backend not in CHOICES:
        raise UsageError(f"unknown backend {backend!r} (choose from {', '.join(CHOICES)})")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return _module(bundle, backend).load(bundle, threads, precision, progress or say, background_load)


def gpu_backend_usable() -> bool:
    """Whether `auto` could run a traced bundle on a GPU here (TensorRT needs engines built first, so
    ONNX Runtime's CUDA provider decides): what a first-use export is made for."""
    return onnxruntime_cuda.device_usable()


def _module(bundle: Bundle, backend: str) -> ModuleType:
    if bundle.fused_decoder:
        return _fused_module(bundle, backend)
    if backend != "auto":
        return BACKENDS[backend]
    return next(module for module in BACKENDS.values() if module.usable(bundle))


def _fused_module(bundle: Bundle, backend: str) -> ModuleType:
    """A fused decoder (one cache slot per batch row) has a contract only the ONNX Runtime backends
    bind: the CUDA provider's where it can run (auto), else the CPU's."""
    if backend == "tensorrt":
        raise UsageError(f"{bundle.path}: its fused decoder runs on ONNX Runtime (onnxruntime, onnxruntime-cuda); "
                         "export with --decoder traced for tensorrt")
    if backend == "onnxruntime-cuda" or (backend == "auto" and onnxruntime_cuda_fused.usable(bundle)):
        return onnxruntime_cuda_fused
    return onnxruntime_fused
