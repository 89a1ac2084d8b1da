"""The few CUDA runtime calls the GPU backends make, through cuda-python (`cuda.bindings.runtime`).

Imported only by the GPU backends, so qasr.runtime imports without cuda-python.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

from qasr.errors import EngineError


def row_copy(cache_shape: tuple[int, ...], rows_shape: tuple[int, ...], position: int,
             itemsize: int) -> tuple[int, int, int, int, int]:
    """(byte offset into the cache, dst pitch, src pitch, width, height) of the 2D copy that writes
    rows [..., S, hd] into cache [..., P, hd] at `position`: every leading index is one row."""
    *outer, capacity, dim = cache_shape
    width = rows_shape[-2] * dim * itemsize
    return position * dim * itemsize, capacity * dim * itemsize, width, width, math.prod(outer)


class Cuda:
    """The few CUDA runtime calls the GPU backends make; cuda-python returns (error, *values)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime
        except ImportError:
            raise EngineError("cuda-python is not installed (pip install 'cuda-python>=12.6'); "
                              "the GPU backends need it") from None
        self.rt = runtime
        error, count = runtime.cudaGetDeviceCount()
        if error != runtime.cudaError_t.cudaSuccess or count == 0:
            raise EngineError("no CUDA device is visible (check the driver, and CUDA_VISIBLE_DEVICES)")

    def call(self, result: Any) -> Any:
        error, *values = result
        if error != self.rt.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA error: {self.rt.cudaGetErrorString(error)[1].decode()}")
        return values[0] if len(values) == 1 else values

    def device(self) -> dict:
        """This GPU's name and compute capability, as engine records name them."""
        props = self.call(self.rt.cudaGetDeviceProperties(self.call(self.rt.cudaGetDevice())))
        name = props.name.split(b"\0")[0].decode() if isinstance(props.name, bytes) else str(props.name)
        return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}

    def stream(self) -> Any:
        return self.call(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def malloc(self, nbytes: int) -> int:
        return int(self.call(self.rt.cudaMalloc(max(nbytes, 1))))

    def pinned(self, count: int, dtype: Any) -> np.ndarray:
        """A numpy view of page-locked host memory (a CUDA graph may copy from and to it)."""
        dtype = np.dtype(dtype)
        pointer = int(self.call(self.rt.cudaMallocHost(count * dtype.itemsize)))
        ctype = ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctype), (count,))

    def zero(self, pointer: int, nbytes: int, stream: Any) -> None:
        self.call(self.rt.cudaMemsetAsync(pointer, 0, nbytes, stream))

    def to_device(self, pointer: int, array: np.ndarray, stream: Any) -> None:
        self.call(self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, array: np.ndarray, pointer: int, stream: Any) -> None:
        self.call(self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes,
                                          self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def write_rows(self, cache: int, rows: int, geometry: tuple[int, int, int, int, int], stream: Any) -> None:
        offset, dst_pitch, src_pitch, width, height = geometry
        self.call(self.rt.cudaMemcpy2DAsync(cache + offset, dst_pitch, rows, src_pitch, width, height,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    def sync(self, stream: Any) -> None:
        self.call(self.rt.cudaStreamSynchronize(stream))

    def capture(self, stream: Any, enqueue: Any) -> Any:
        """Record what `enqueue()` puts on `stream` into an executable CUDA graph."""
        self.call(self.rt.cudaStreamBeginCapture(stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        enqueue()
        graph = self.call(self.rt.cudaStreamEndCapture(stream))
        executable = self.call(self.rt.cudaGraphInstantiate(graph, 0))
        self.call(self.rt.cudaGraphDestroy(graph))
        return executable

    def launch(self, graph: Any, stream: Any) -> None:
        self.call(self.rt.cudaGraphLaunch(graph, stream))

    def free(self, pointer: int) -> None:
        self.call(self.rt.cudaFree(pointer))
