"""ONNX Runtime on a GPU: the second GPU path, for machines without TensorRT's Python API.

onnxruntime-gpu's CUDA execution provider (or its TensorRT provider) runs the bundle's graphs:
the fp32 ones, or the derived fp16 ones (`qasr build BUNDLE --precision fp16 --graphs-only`).
The KV cache is a device OrtValue shared by the batch's requests (each in its own rows) and bound
through IO binding; new K/V rows come back as a device output and go into the cache with one
strided device-to-device copy per request (cuda-python's cudaMemcpy2DAsync, the same geometry as
the TensorRT backend), so per step only the ids and positions go in and the greedy ids come out.

A decode step's inputs are OrtValues of their own, allocated once per batch size and refreshed
with `update_inplace` before every run. Writing into a host numpy array that was bound earlier is
not enough: the CUDA provider copies a host input to the device when it is bound, so every later
run would read the first binding's ids and positions (the fault that once decoded garbage after
the first token).

`device="cpu"` runs the same binding logic on the CPU provider, and binds like the CUDA provider
does: each input is a private copy, never a view of an array the backend writes later. That is
how the binding and the derived fp16 graphs are checked on a machine without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from qasr.errors import BundleError, EngineError, UsageError, first_line
from qasr.jsonfile import read_json
from qasr.progress import Progress
from qasr.runtime.backends.cuda import Cuda, row_copy
from qasr.runtime.backends.interface import PRECISIONS, Backend
from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend, session_options
from qasr.runtime.bundle import DERIVED_RECORD, ENGINES, Bundle, cache_names, derived_dir, derived_is_current
from qasr.runtime.resolve import derive_graphs

PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# A graph's float type -> the element type ORT allocates and binds (numpy's, or ONNX's number for
# bf16, which numpy lacks: only device buffers ever hold it) and its size in bytes.
CACHE_TYPES: dict[str, tuple[Any, int]] = {"float32": (np.float32, 4), "float16": (np.float16, 2), "bfloat16": (16, 2)}
GPU_AUTO = "fp16"  # what `--precision auto` runs on onnxruntime-cuda: see docs/tensorrt.md for the figures
STEP_INPUTS = ("input_ids", "position", "cache_start")
# ONNX Runtime's own log level for the GPU sessions: errors only (3), so normal operation prints
# nothing (it warns about Memcpy nodes and plugin devices on every session); 0-2 to debug.
LOG_LEVEL = int(os.environ.get("QASR_ORT_LOG_LEVEL", "3"))


def derived_graphs(bundle: Bundle, precision: str) -> dict:
    """The contracts of the derived graphs, or one line on how to derive them."""
    if not derived_is_current(bundle, precision):
        raise BundleError(f"{derived_dir(bundle, precision)}: no current {precision} graphs; derive them with "
                          f"`qasr build {bundle.path} --precision {precision} --graphs-only`")
    return read_json(derived_dir(bundle, precision) / DERIVED_RECORD, BundleError)["graphs"]


def cuda_provider_available() -> bool:
    return PROVIDERS["cuda"] in ort.get_available_providers()


def require_cuda_provider() -> None:
    """One line, before anything is derived or loaded, where onnxruntime-gpu is missing."""
    if not cuda_provider_available():
        raise EngineError("onnxruntime-gpu with the CUDA execution provider is not installed "
                          "(pip install onnxruntime-gpu, and uninstall onnxruntime)")


def gpu_precision(bundle: Bundle, precision: str) -> str:
    """The graphs `precision` runs on this bundle. `auto`: GPU_AUTO for an fp32 bundle whose GPU_AUTO
    graphs exist or can be derived here (onnx installed, the bundle writable), else the bundle's own."""
    if precision != "auto":
        return precision
    if bundle.manifest.get("weights"):
        return "fp32"
    if derived_is_current(bundle, GPU_AUTO):
        return GPU_AUTO
    derivable = importlib.util.find_spec("onnx") is not None and os.access(bundle.path, os.W_OK)
    return GPU_AUTO if derivable else "fp32"


@functools.cache
def quiet_onnxruntime() -> None:
    """ONNX Runtime's process-wide logger at LOG_LEVEL; its CUDA libraries found in pip's nvidia
    packages where they are installed (onnxruntime-gpu's preload_dlls, 1.21 and later). Both are
    process-wide, so once per process, not once per backend."""
    ort.set_default_logger_severity(LOG_LEVEL)
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    name, device_label = "onnxruntime-cuda", "CUDA GPU"

    def __init__(self, bundle: Bundle, precision: str = "fp32", provider: str = "cuda", device: str = "cuda",
                 device_id: int = 0, threads: int | None = None, background_load: bool = True):
        if precision not in PRECISIONS[1:]:
            raise UsageError(f"onnxruntime-cuda runs fp32, fp16 or bf16 graphs, not {precision}")
        if precision != "fp32" and bundle.manifest.get("weights"):
            raise UsageError(f"{bundle.path}: {bundle.manifest['precision']} weights run as they are "
                             f"(--precision fp32); {precision} graphs are derived from an fp32 bundle")
        self.precision = precision
        self.graphs = bundle.manifest["graphs"] if precision == "fp32" else derived_graphs(bundle, precision)
        self.graph_dir = bundle.path if precision == "fp32" else derived_dir(bundle, precision)
        self.device, self.device_id = device, device_id
        if device == "cuda":
            require_cuda_provider()
            quiet_onnxruntime()
            self.cuda = Cuda()
            self.stream = self.cuda.stream()
        self.options = session_options(threads)  # one set for every graph: no CPU packing or arena choices
        self.options.log_severity_level = LOG_LEVEL
        super().__init__(bundle, threads=threads, providers=self._providers(bundle, provider, precision),
                         background_load=background_load)
        cache = self.graphs["decoder"]["inputs"]["past_key_0"]["dtype"] if "decoder" in self.graphs else "float32"
        self.cache_type, self.itemsize = CACHE_TYPES[cache]
        self.cache_value: Any = None
        self.device_steps: dict[int, DeviceCall] = {}
        self.last_device: Any = None

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
        return self._open(name, self.providers)

    def _open(self, name: str, providers: list) -> ort.InferenceSession:
        path = self.graph_dir / self.graphs[name]["file"]
        if not path.is_file():
            raise BundleError(f"{path}: missing")
        try:
            session = ort.InferenceSession(str(path), self.options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types, all with a message
            raise BundleError(f"{path}: ONNX Runtime {ort.__version__} cannot load it on "
                              f"{providers[0] if isinstance(providers[0], str) else providers[0][0]}"
                              f" ({first_line(exc)})") from None
        if self.device == "cuda" and PROVIDERS["cuda"] not in session.get_providers():
            raise EngineError("onnxruntime-gpu could not start its CUDA provider (its CUDA 13 and cuDNN 9 "
                              "libraries were not found: pip install \"qwen3-asr-edge[gpu]\", or set "
                              "LD_LIBRARY_PATH); rerun with QASR_ORT_LOG_LEVEL=1 for ONNX Runtime's reasons")
        return session

    def _zeros(self, shape: tuple[int, ...], dtype: Any, itemsize: int = 4) -> tuple[ort.OrtValue, np.ndarray | None]:
        """A zero-filled OrtValue on the device (with its numpy array when the device is the CPU)."""
        if self.device == "cpu":
            array = np.zeros(shape, dtype=dtype)
            return ort.OrtValue.ortvalue_from_numpy(array), array
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", self.device_id)
        self.cuda.zero(value.data_ptr(), int(np.prod(shape)) * itemsize, self.stream)
        self.cuda.sync(self.stream)
        return value, None

    def reserve(self, rows: int, keep: bool = True) -> None:
        """The device cache, grown (or sized afresh) in place of the old one."""
        layers, two, one, heads, _, dim = self.cache_shape
        shape = (layers, two, one, heads, rows, dim)
        old, old_array = self.cache_value, self.cache
        if old is not None and tuple(old.shape()) == shape:
            return
        self.cache_value, self.cache = self._zeros(shape, self.cache_type, self.itemsize)
        self.steps, self.device_steps = {}, {}
        if not keep or old is None:
            return
        kept = min(rows, old.shape()[4])
        if self.cache is not None and old_array is not None:
            self.cache[:, :, :, :, :kept] = old_array[:, :, :, :, :kept]
            return
        itemsize = self.itemsize
        offset, pitch, _, width, height = row_copy(shape, shape[:4] + (kept, dim), 0, itemsize)
        self.cuda.write_rows(self.cache_value.data_ptr(), old.data_ptr(),
                             (offset, pitch, old.shape()[4] * dim * itemsize, width, height), self.stream)
        self.cuda.sync(self.stream)

    @property
    def reserved(self) -> int:
        return 0 if self.cache_value is None else int(self.cache_value.shape()[4])

    def _input(self, array: np.ndarray) -> ort.OrtValue:
        """A copy of `array` on the device: later writes to `array` never reach it (update it with
        `update_inplace`). On the CPU device too, so that the CPU tests bind as CUDA does."""
        return ort.OrtValue.ortvalue_from_numpy(np.array(array, copy=True), self.device, self.device_id)

    def _device_call(self, ids: np.ndarray, audio: ort.OrtValue, positions: np.ndarray, starts: np.ndarray) -> DeviceCall:
        """Every input but the cache is a value of the call's own; logits and new K/V rows stay on the device."""
        layers, two, _, heads, _, dim = self.cache_shape
        batch, new = ids.shape
        vocab = self.graphs["decoder"]["outputs"]["logits"]["shape"][1]
        inputs = {name: self._input(array) for name, array in zip(STEP_INPUTS, (ids, positions, starts))}
        call = DeviceCall(inputs, np.zeros(batch, dtype=np.int64), self._zeros((batch, vocab), np.float32)[0],
                          self._zeros((batch, layers, two, heads, new, dim), self.cache_type, self.itemsize),
                          self.sessions["decoder"].io_binding())
        binding = call.binding
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_input("audio_embeds", audio)
        self._bind_cache(binding)
        binding.bind_ortvalue_output("next_token", ort.OrtValue.ortvalue_from_numpy(call.next_token))
        binding.bind_ortvalue_output("logits", call.logits)
        binding.bind_ortvalue_output("new_kv", call.rows[0])
        return call

    def _bind_cache(self, binding: ort.IOBinding) -> None:
        """Each layer's K and V: a contiguous block of the one cache allocation, bound in place."""
        layers, two, *layer_shape = self.cache_value.shape()
        block = int(np.prod(layer_shape)) * self.itemsize
        for i, name in enumerate(cache_names(layers)):
            if self.cache is not None:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(self.cache[i // 2, i % 2]))
            else:
                binding.bind_input(name, "cuda", self.device_id, self.cache_type, layer_shape,
                                   self.cache_value.data_ptr() + i * block)

    def prefill(self, input_ids, audio_embeds, start, position):
        """On the device the chunk reads the whole cache in place (attention there is cheap)."""
        self._check_rows(start + position + input_ids.shape[1])
        audio = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(audio_embeds, dtype=np.float32),
                                                 self.device, self.device_id)
        call = self._device_call(np.ascontiguousarray(input_ids, dtype=np.int64), audio,
                                 np.array([position], dtype=np.int64), np.array([start], dtype=np.int64))
        self.sessions["decoder"].run_with_iobinding(call.binding)
        self._write_rows(call.rows, 0, start + position)
        self.cuda_sync()
        self.last_device = call
        return int(call.next_token[0])

    def step(self, ids, starts, positions):
        batch = len(ids)
        rows = np.asarray(starts) + np.asarray(positions)
        self._check_rows(int(rows.max()) + 1)
        if batch not in self.device_steps:
            audio, _ = self._zeros((batch, 1, self.hidden_size), np.float32)
            self.device_steps[batch] = self._device_call(np.zeros((batch, 1), dtype=np.int64), audio,
                                                         np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64))
        call = self.device_steps[batch]
        feeds = (np.reshape(ids, (batch, 1)), positions, starts)
        for name, array in zip(STEP_INPUTS, feeds):
            call.inputs[name].update_inplace(np.ascontiguousarray(array, dtype=np.int64))
        self.sessions["decoder"].run_with_iobinding(call.binding)
        for b, row in enumerate(rows):
            self._write_rows(call.rows, b, int(row))
        self.cuda_sync()
        self.last_device = call
        return call.next_token.copy()

    def _write_rows(self, rows: tuple[ort.OrtValue, np.ndarray | None], batch_row: int, cache_row: int) -> None:
        """Batch row `batch_row` of new_kv [B, L, 2, kvh, S, hd] into the cache at `cache_row`."""
        value, array = rows
        if self.cache is not None and array is not None:
            self.cache[:, :, 0, :, cache_row : cache_row + array.shape[4]] = array[batch_row]
            return
        _, layers, two, heads, new, dim = value.shape()
        itemsize = self.itemsize
        geometry = row_copy(tuple(self.cache_value.shape()), (layers, two, 1, heads, new, dim), cache_row, itemsize)
        source = value.data_ptr() + batch_row * layers * two * heads * new * dim * itemsize
        self.cuda.write_rows(self.cache_value.data_ptr(), source, geometry, self.stream)

    def cuda_sync(self) -> None:
        if self.device == "cuda":
            self.cuda.sync(self.stream)

    def step_logits(self):
        return self.last_device.logits.numpy()


@dataclass
class DeviceCall:
    """A bound decoder call: its own input values (ids, positions, cache starts), the greedy ids on
    the host, logits and new K/V rows on the device."""

    inputs: dict[str, ort.OrtValue]
    next_token: np.ndarray
    logits: ort.OrtValue
    rows: tuple[ort.OrtValue, np.ndarray | None]
    binding: ort.IOBinding


def usable(bundle: Bundle) -> bool:
    return device_usable()


def device_usable() -> bool:
    """onnxruntime-gpu with its CUDA provider, cuda-python, and a visible device."""
    if not cuda_provider_available():
        return False
    try:
        Cuda()
    except EngineError:
        return False
    return True


def load(bundle: Bundle, threads: int | None, precision: str, progress: Progress,
         background_load: bool = True) -> Backend:
    """The bundle's graphs at `precision` (auto: gpu_precision), derived on first use if need be."""
    require_cuda_provider()
    chosen = gpu_precision(bundle, precision)
    if chosen != "fp32":
        derive_graphs(bundle, chosen, progress)
    return OnnxRuntimeCudaBackend(bundle, precision=chosen, threads=threads, background_load=background_load)
