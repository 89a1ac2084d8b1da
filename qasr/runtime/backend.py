"""The small interface every inference engine implements over the bundle's graph contracts.

The greedy loop, the KV-cache bookkeeping and the pipelines are written once against it and
tested on ONNX Runtime; TensorRT implements the same calls with its cache on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from qasr.errors import UsageError
from qasr.runtime.bundle import Bundle

BACKENDS = ("auto", "onnxruntime", "tensorrt")


class Backend(ABC):
    name: str

    @abstractmethod
    def encode(self, mel: np.ndarray, frames: np.ndarray, conv_frames: np.ndarray) -> np.ndarray:
        """Encoder windows [W, 128, F] -> hidden states [W, window_tokens, d_model]."""

    @abstractmethod
    def project(self, hidden: np.ndarray) -> np.ndarray:
        """Encoder states [N, d_model] -> audio embeddings [N, hidden]."""

    @abstractmethod
    def begin(self, capacity: int) -> None:
        """Prepare the KV cache for one request of at most `capacity` tokens (allocated once)."""

    @abstractmethod
    def decode(self, input_ids: np.ndarray, audio_embeds: np.ndarray, position: int) -> int:
        """Run ids [1, S] at `position`, store their K/V rows in the cache, return the greedy next id."""

    @abstractmethod
    def logits(self) -> np.ndarray:
        """Logits [vocab] of the last position of the last `decode` call (for parity checks)."""

    @abstractmethod
    def align(self, input_ids: np.ndarray, audio_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligner pass: ids [1, S] -> (class ids [K], logits [K, classes]) at the timestamp slots."""


def open_backend(bundle: Bundle, backend: str = "auto", threads: int | None = None) -> Backend:
    """Pick and open a backend: TensorRT where the bundle has engines for this GPU, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "tensorrt" or (backend == "auto" and _tensorrt_usable(bundle)):
        from qasr.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(bundle)
    from qasr.runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, threads=threads)


def _tensorrt_usable(bundle: Bundle) -> bool:
    """auto picks TensorRT only when engines were built into the bundle and TensorRT imports."""
    if not (bundle.path / "engines").is_dir():
        return False
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True
