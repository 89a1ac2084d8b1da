"""ONNX Runtime on a GPU: the second GPU path, for machines without TensorRT's Python API.

onnxruntime-gpu's CUDA execution provider (or its TensorRT provider) runs the bundle's graphs:
the fp32 ones, or the derived fp16 ones (`qasr build BUNDLE --precision fp16 --graphs-only`).
The KV cache is a device OrtValue bound through IO binding for the whole request; new K/V rows
come back as a device output and go into the cache with one strided device-to-device copy
(cuda-python's cudaMemcpy2DAsync, the same geometry as the TensorRT backend), so per token only
the id and position go in and the greedy id comes out. bf16 graphs are TensorRT's: the CUDA
provider lacks bf16 kernels for several elementwise ops.

`device="cpu"` runs the same binding logic on the CPU provider with numpy buffers: it is how the
derived fp16 graphs are checked numerically on a machine without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qasr.errors import BundleError, EngineError, UsageError
from qasr.runtime.bundle import Bundle, cache_names
from qasr.runtime.onnxruntime_backend import OnnxRuntimeBackend
from qasr.runtime.cuda import Cuda, prefix_copy, row_copy
from qasr.runtime.tensorrt_backend import ENGINES

DERIVED = "derived"
RECORD = "graphs.json"
PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16}


def derived_dir(bundle: Bundle, precision: str) -> Path:
    return bundle.path / DERIVED / precision


def derived_is_current(bundle: Bundle, precision: str) -> bool:
    """True when BUNDLE/derived/<precision> was derived from this bundle's checkpoint."""
    file = derived_dir(bundle, precision) / RECORD
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("source_sha256") == bundle.manifest["source"]["sha256"]


def derived_graphs(bundle: Bundle, precision: str) -> dict:
    """The contracts of the derived graphs, or one line on how to derive them."""
    if not derived_is_current(bundle, precision):
        raise BundleError(f"{derived_dir(bundle, precision)}: no current {precision} graphs; derive them with "
                          f"`qasr build {bundle.path} --precision {precision} --graphs-only`")
    return json.loads((derived_dir(bundle, precision) / RECORD).read_text(encoding="utf-8"))["graphs"]


def cuda_provider_available() -> bool:
    return PROVIDERS["cuda"] in ort.get_available_providers()


class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    name = "onnxruntime-cuda"

    def __init__(self, bundle: Bundle, precision: str = "fp32", provider: str = "cuda", device: str = "cuda",
                 device_id: int = 0, threads: int | None = None):
        if precision not in ("fp32", "fp16"):
            raise UsageError(f"onnxruntime-cuda runs fp32 or fp16 graphs, not {precision} (bf16 is for TensorRT)")
        self.graphs = bundle.manifest["graphs"] if precision == "fp32" else derived_graphs(bundle, precision)
        self.graph_dir = bundle.path if precision == "fp32" else derived_dir(bundle, precision)
        self.device, self.device_id = device, device_id
        if device == "cuda":
            if not cuda_provider_available():
                raise EngineError("onnxruntime-gpu with the CUDA execution provider is not installed "
                                  "(pip install onnxruntime-gpu, and uninstall onnxruntime)")
            self.cuda = Cuda()
            self.stream = self.cuda.stream()
        super().__init__(bundle, threads=threads, providers=self._providers(bundle, provider, precision))
        self.cache_type = NUMPY_TYPES[self.graphs["decoder"]["inputs"]["past_key_0"]["dtype"]] \
            if "decoder" in self.graphs else np.float32
        self.cache_value: Any = None

    def _providers(self, bundle: Bundle, provider: str, precision: str) -> list:
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        cuda = (PROVIDERS["cuda"], {"device_id": self.device_id})
        if provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        cache = str(bundle.path / ENGINES / "onnxruntime-trt")
        trt = (PROVIDERS["tensorrt"], {"device_id": self.device_id, "trt_fp16_enable": precision == "fp16",
                                       "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                       "trt_timing_cache_enable": True, "trt_timing_cache_path": cache})
        return [trt, cuda, "CPUExecutionProvider"]

    def _session(self, name: str) -> ort.InferenceSession:
        path = self.graph_dir / self.graphs[name]["file"]
        if not path.is_file():
            raise BundleError(f"{path}: missing")
        try:
            return ort.InferenceSession(str(path), self.options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types, all with a message
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None

    def _zeros(self, shape: tuple[int, ...], dtype: Any) -> tuple[ort.OrtValue, np.ndarray | None]:
        """A zero-filled OrtValue on the device (with its numpy array when the device is the CPU)."""
        if self.device == "cpu":
            array = np.zeros(shape, dtype=dtype)
            return ort.OrtValue.ortvalue_from_numpy(array), array
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", self.device_id)
        self.cuda.zero(value.data_ptr(), int(np.prod(shape)) * np.dtype(dtype).itemsize, self.stream)
        self.cuda.sync(self.stream)
        return value, None

    def begin(self, capacity: int, keep: int = 0, owner: object | None = None) -> int:
        """The device cache for this request, and the decode step bound once to device buffers.

        As on the CPU backend, a stream's cache (an `owner`) is kept while large enough and grows
        with headroom, its first `keep` rows copied on the device.
        """
        layers, two, batch, heads, _, dim = self.cache_shape
        keep = keep if owner is not None and owner is self.owner else 0
        self.owner = owner
        size = self.cache_value.shape()[4] if self.cache_value is not None else 0
        if size < capacity or (owner is None and size != capacity):
            rows = capacity if owner is None else capacity + capacity // 2
            old_value, old = self.cache_value, self.cache
            shape = (layers, two, batch, heads, rows, dim)
            self.cache_value, new = self._zeros(shape, self.cache_type)
            self.cache = new
            if keep and old is not None and new is not None:
                new[:, :, :, :, :keep] = old[:, :, :, :, :keep]
            elif keep:
                geometry = prefix_copy(shape, size, keep, np.dtype(self.cache_type).itemsize)
                self.cuda.write_rows(self.cache_value.data_ptr(), old_value.data_ptr(), geometry, self.stream)
                self.cuda.sync(self.stream)
        vocab = self.graphs["decoder"]["outputs"]["logits"]["shape"][1]
        self.step_ids = np.zeros((1, 1), dtype=np.int64)
        self.step_position = np.zeros(1, dtype=np.int64)
        self.next_token = np.zeros(1, dtype=np.int64)
        self.step_audio, _ = self._zeros((1, 1, self.hidden_size), np.float32)
        self.step_logits, _ = self._zeros((1, vocab), np.float32)
        self.step_new_kv = self._zeros((layers, two, batch, heads, 1, dim), self.cache_type)
        self.step_binding = self._bind_device(self.step_ids, self.step_audio, self.step_position,
                                              self.step_logits, self.step_new_kv[0])
        self.last_logits_value = self.step_logits
        return keep

    def _bind_device(self, ids: np.ndarray, audio: ort.OrtValue, position: np.ndarray, logits: ort.OrtValue,
                     rows: ort.OrtValue) -> ort.IOBinding:
        """ids and position stay host arrays (ORT copies their 16 bytes in); the rest is on the device."""
        binding = self.sessions["decoder"].io_binding()
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids))
        binding.bind_ortvalue_input("position", ort.OrtValue.ortvalue_from_numpy(position))
        binding.bind_ortvalue_input("audio_embeds", audio)
        self._bind_cache(binding)
        binding.bind_ortvalue_output("next_token", ort.OrtValue.ortvalue_from_numpy(self.next_token))
        binding.bind_ortvalue_output("logits", logits)
        binding.bind_ortvalue_output("new_kv", rows)
        return binding

    def _bind_cache(self, binding: ort.IOBinding) -> None:
        """Each layer's K and V: a contiguous block of the one cache allocation, bound in place."""
        layers, two, *layer_shape = self.cache_value.shape()
        block = int(np.prod(layer_shape)) * np.dtype(self.cache_type).itemsize
        for i, name in enumerate(cache_names(layers)):
            if self.cache is not None:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(self.cache[i // 2, i % 2]))
            else:
                binding.bind_input(name, "cuda", self.device_id, self.cache_type, layer_shape,
                                   self.cache_value.data_ptr() + i * block)

    def decode(self, input_ids, audio_embeds, position):
        new = input_ids.shape[1]
        if new == 1:
            self.step_ids[0, 0] = input_ids[0, 0]
            self.step_position[0] = position
            binding, new_kv = self.step_binding, self.step_new_kv
            self.last_logits_value = self.step_logits
        else:
            layers, two, batch, heads, _, dim = self.cache_shape
            new_kv = self._zeros((layers, two, batch, heads, new, dim), self.cache_type)
            audio = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(audio_embeds, dtype=np.float32),
                                                     self.device, self.device_id)
            self.last_logits_value, _ = self._zeros((1, self.step_logits.shape()[1]), np.float32)
            binding = self._bind_device(np.ascontiguousarray(input_ids, dtype=np.int64), audio,
                                        np.array([position], dtype=np.int64), self.last_logits_value, new_kv[0])
        self.sessions["decoder"].run_with_iobinding(binding)
        self._write_rows(new_kv, position)
        return int(self.next_token[0])

    def _write_rows(self, rows: tuple[ort.OrtValue, np.ndarray | None], position: int) -> None:
        value, array = rows
        if self.cache is not None and array is not None:
            self.cache[:, :, :, :, position : position + array.shape[4]] = array
            return
        geometry = row_copy(tuple(self.cache_value.shape()), tuple(value.shape()), position,
                            np.dtype(self.cache_type).itemsize)
        self.cuda.write_rows(self.cache_value.data_ptr(), value.data_ptr(), geometry, self.stream)
        self.cuda.sync(self.stream)

    def logits(self):
        return self.last_logits_value.numpy()[0]
