"""The small interface every inference engine implements over the bundle's graph contracts.

The greedy loop, the KV-cache bookkeeping and the pipelines are written once against it and
tested on ONNX Runtime; TensorRT implements the same calls with its cache on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from qasr.errors import EngineError, UsageError
from qasr.runtime.bundle import ENGINES, ENGINES_RECORD, Bundle
from qasr.runtime.resolve import say

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cuda", "tensorrt")


class Backend(ABC):
    name: str

    @abstractmethod
    def encode(self, mel: np.ndarray, frames: np.ndarray, conv_frames: np.ndarray) -> np.ndarray:
        """Encoder windows [W, 128, F] -> hidden states [W, window_tokens, d_model]."""

    @abstractmethod
    def project(self, hidden: np.ndarray) -> np.ndarray:
        """Encoder states [N, d_model] -> audio embeddings [N, hidden]."""

    holder: object | None = None  # the batch engine whose requests the cache's rows hold (it sets this)

    @property
    @abstractmethod
    def reserved(self) -> int:
        """Rows the shared cache holds now."""

    @abstractmethod
    def reserve(self, rows: int, keep: bool = True) -> None:
        """Size the KV cache shared by all requests to `rows` token rows, keeping the rows it holds
        when `keep` (else they may be dropped). New rows are zero: a masked row still meets a zero
        attention weight, and 0 x NaN from uninitialised memory would poison the output."""

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, audio_embeds: np.ndarray, start: int, position: int) -> int:
        """Run one request's ids [1, S] at `position`, its cache region beginning at row `start`;
        store their K/V rows there and return the greedy next id."""

    @abstractmethod
    def step(self, ids: np.ndarray, starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step of B requests: ids [B] at positions [B] of the regions at starts [B];
        stores each row's K/V and returns the greedy next ids [B]."""

    @abstractmethod
    def step_logits(self) -> np.ndarray:
        """Logits [B, vocab] of the last position of each row of the last `prefill` or `step`."""

    @abstractmethod
    def align(self, input_ids: np.ndarray, audio_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligner pass: ids [1, S] -> (class ids [K], logits [K, classes]) at the timestamp slots."""


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def open_backend(bundle: Bundle, backend: str = "auto", threads: int | None = None, precision: str = "auto",
                 progress: Callable[[str], None] | None = None) -> Backend:
    """Open `backend`; auto picks TensorRT where the bundle has engines and TensorRT is installed, then
    ONNX Runtime on a CUDA device, then ONNX Runtime on the CPU.

    `precision` is the GPU's compute type: TensorRT's engines have theirs from `qasr build`; on
    onnxruntime-cuda, fp16 and bf16 graphs are derived from the fp32 ones on first use and kept in
    the bundle. `auto` is GPU_AUTO there (an fp32 bundle's fp16 graphs, which pass `qasr verify`
    on the GPU), the bundle's own graphs elsewhere. The CPU runs the bundle's graphs only."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if bundle.fused_decoder:  # the CUDA and TensorRT backends bind the traced decoder's contract
        if backend not in ("auto", "onnxruntime"):
            raise UsageError(f"{bundle.path}: its fused decoder runs on the onnxruntime backend only; "
                             "export with --decoder traced for " + backend)
        if precision not in ("auto", "fp32"):
            raise UsageError(f"--precision {precision} is for the GPU backends; a fused bundle runs on the CPU")
        from qasr.runtime.onnxruntime_fused import OnnxRuntimeFusedBackend

        return OnnxRuntimeFusedBackend(bundle, threads=threads)
    if backend == "tensorrt" or (backend == "auto" and _tensorrt_usable(bundle)):
        from qasr.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(bundle, precision)
    if backend == "onnxruntime-cuda" or (backend == "auto" and _cuda_usable()):
        from qasr.runtime.onnxruntime_cuda import OnnxRuntimeCudaBackend, ensure_derived, gpu_precision

        chosen = gpu_precision(bundle, precision)
        if chosen != "fp32":
            ensure_derived(bundle, chosen, progress or say)
        return OnnxRuntimeCudaBackend(bundle, precision=chosen, threads=threads)
    if precision not in ("auto", "fp32"):
        raise UsageError(f"--precision {precision} is for the GPU backends (onnxruntime-cuda, tensorrt); on the "
                         "CPU, smaller weights come from `qasr export --weights int8|int4`")
    from qasr.runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, threads=threads)


def _tensorrt_usable(bundle: Bundle) -> bool:
    from qasr.runtime.tensorrt_backend import tensorrt_version

    if not (bundle.path / ENGINES / ENGINES_RECORD).is_file():
        return False
    try:
        tensorrt_version()  # tensorrt-stubs alone imports as an empty package
    except EngineError:
        return False
    return True


def _cuda_usable() -> bool:
    """onnxruntime-gpu with its CUDA provider, cuda-python, and a visible device."""
    from qasr.runtime.onnxruntime_cuda import cuda_provider_available

    if not cuda_provider_available():
        return False
    from qasr.runtime.cuda import Cuda

    try:
        Cuda()
    except EngineError:
        return False
    return True
