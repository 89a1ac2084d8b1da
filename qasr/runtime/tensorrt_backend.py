"""TensorRT backend: the engines `qasr build` compiled into the bundle, the KV cache on the GPU.

Per request, one device cache [L, 2, 1, kvh, P, hd] in the engine's own type (bf16 for a bf16
build), zeroed once, each layer's K and V bound as a block of it (past_key_i, past_value_i), and
written in place: a call's new K/V rows go in with one strided
device-to-device copy (cudaMemcpy2DAsync: L*2*kvh rows of S*hd elements at pitch P*hd). Per token,
the decode step is a CUDA graph captured once per request: two 8-byte copies from pinned host
memory (token id, position), execute_async_v3, and the greedy id (argmax in the graph) copied
back; logits cross only when `logits()` asks. One stream, one execution context per optimization
profile (the decoder's prefill and decode profiles), no allocation per token.

tensorrt and cuda-python (`cuda.bindings.runtime`) are imported here only, and lazily, so that
qasr.runtime imports without them. The TensorRT calls follow the documented Python API:
set_input_shape, set_tensor_address, execute_async_v3, set_optimization_profile_async.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from qasr.errors import EngineError
from qasr.runtime.backend import Backend
from qasr.runtime.bundle import Bundle
from qasr.runtime.cuda import Cuda, prefix_copy, row_copy

if TYPE_CHECKING:
    import tensorrt as trt

ENGINES = "engines"
RECORD = "engines.json"
RECORD_FORMAT = ("qasr-engines", 1)
CAPACITY_STEP = 256  # cache capacities round up to this, so that requests reuse one captured graph
MISSING_TENSORRT = ("TensorRT is not installed (pip install tensorrt; on Jetson use JetPack's python3-libnvinfer); "
                    "it is needed to build and run engines")


def tensorrt_version() -> str:
    """TensorRT's version, or one line saying it is missing (tensorrt-stubs alone is no TensorRT).

    Every later `import tensorrt` in qasr sits inside a function that runs after this check.
    """
    try:
        import tensorrt
    except ImportError:
        raise EngineError(MISSING_TENSORRT) from None
    if not hasattr(tensorrt, "Builder"):
        raise EngineError(MISSING_TENSORRT)
    return tensorrt.__version__


def rebuild_hint(bundle: Bundle, record: dict | None = None) -> str:
    record = record or {}
    weights = f" --weights {record['weights']}" if record.get("weights", "fp32") != "fp32" else ""
    return (f"rebuild with `qasr build {bundle.path} --precision {record.get('precision', 'bf16')}{weights}"
            f" --max-audio {record.get('max_audio_s', 1200):g}`")


def load_record(bundle: Bundle) -> dict:
    file = bundle.path / ENGINES / RECORD
    if not file.is_file():
        raise EngineError(f"{bundle.path}: no TensorRT engines; build them with `qasr build {bundle.path}`")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{file}: not valid JSON ({exc}); {rebuild_hint(bundle)}") from None
    return record


def check_record(record: dict, bundle: Bundle, here: dict) -> None:
    """Refuse, in one line, engines built for another bundle, TensorRT version or GPU."""
    problems = []
    if (record.get("format"), record.get("format_version")) != RECORD_FORMAT:
        problems.append("another qasr engine format")
    if record.get("source_sha256") != bundle.manifest["source"]["sha256"]:
        problems.append("another bundle (its checkpoint differs)")
    if record.get("tensorrt") != here["tensorrt"]:
        problems.append(f"TensorRT {record.get('tensorrt')} (this machine has {here['tensorrt']})")
    if (record.get("gpu"), record.get("compute_capability")) != (here["gpu"], here["compute_capability"]):
        problems.append(f"{record.get('gpu')} (sm {record.get('compute_capability')}; this machine has "
                        f"{here['gpu']}, sm {here['compute_capability']})")
    if problems:
        raise EngineError(f"{bundle.path / ENGINES}: engines were built for {' and '.join(problems)}; "
                          f"{rebuild_hint(bundle, record)}")


def dims(shape: trt.Dims) -> tuple[int, ...]:
    return tuple(shape[i] for i in range(len(shape)))


class Runner:
    """One engine on one optimization profile: a context and grow-only device buffers per tensor."""

    def __init__(self, cuda: Cuda, engine: trt.ICudaEngine, profile: int, stream: Any):
        import tensorrt as trt

        self.cuda, self.engine, self.stream = cuda, engine, stream
        self.context = engine.create_execution_context()
        self.context.set_optimization_profile_async(profile, int(stream))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.allocator: Any = None  # for outputs whose shape depends on the data (the aligner's slots)

    def itemsize(self, name: str) -> int:
        return int(self.engine.get_tensor_dtype(name).itemsize)

    def buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self.cuda.free(pointer)
            pointer, size = self.cuda.malloc(nbytes), nbytes
            self.buffers[name] = (pointer, size)
        self.context.set_tensor_address(name, pointer)
        return pointer

    def bind_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Set the input shapes and bind buffers big enough for the inputs and outputs."""
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise EngineError(f"TensorRT refused shape {shape} for {name}: outside the engine's profile "
                                  "(rebuild with a larger --max-audio)")
            self.buffer(name, math.prod(shape) * self.itemsize(name))
        for name in self.outputs:
            shape = dims(self.context.get_tensor_shape(name))
            if min(shape, default=0) < 0:
                self.allocator = self.allocator or output_allocator(self.cuda)
                self.context.set_output_allocator(name, self.allocator)
            else:
                self.buffer(name, math.prod(shape) * self.itemsize(name))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Copy `feeds` in, execute, copy every output back (the per-clip graphs)."""
        import tensorrt as trt

        self.bind_shapes({name: tuple(array.shape) for name, array in feeds.items()})
        for name, array in feeds.items():
            self.cuda.to_device(self.buffers[name][0], np.ascontiguousarray(array), self.stream)
        if not self.context.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT failed to execute the engine")
        self.cuda.sync(self.stream)
        results = []
        for name in self.outputs:
            if name in self.buffers:
                pointer, shape = self.buffers[name][0], dims(self.context.get_tensor_shape(name))
            else:
                pointer, shape = self.allocator.buffers[name][0], self.allocator.shapes[name]
            results.append(np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name))))
            self.cuda.to_host(results[-1], pointer, self.stream)
        self.cuda.sync(self.stream)
        return results

    def close(self) -> None:
        buffers = [*self.buffers.values(), *(self.allocator.buffers.values() if self.allocator else [])]
        for pointer, _ in buffers:
            self.cuda.free(pointer)
        self.buffers.clear()


def output_allocator(cuda: Cuda) -> Any:
    """A trt.IOutputAllocator keeping one grow-only buffer per data-dependent output."""
    import tensorrt as trt

    class Allocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, tuple[int, int]] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            pointer, have = self.buffers.get(tensor_name, (0, 0))
            if have < size:
                if pointer:
                    cuda.free(pointer)
                pointer, have = cuda.malloc(size), size
                self.buffers[tensor_name] = (pointer, have)
            return pointer

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            return self.reallocate_output_async(tensor_name, memory, size, alignment, 0)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shapes[tensor_name] = tuple(shape)

    return Allocator()


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        version = tensorrt_version()
        self.cuda = Cuda()
        self.record = load_record(bundle)
        check_record(self.record, bundle, {"tensorrt": version, **self.cuda.device()})
        import tensorrt as trt

        self.stream = self.cuda.stream()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {name: self._engine(entry["file"]) for name, entry in self.record["engines"].items()}
        self.runners = {name: Runner(self.cuda, engine, 0, self.stream) for name, engine in self.engines.items()}
        if "decoder" in self.engines:
            self._open_decoder()

    def _engine(self, file: str) -> trt.ICudaEngine:
        path = self.bundle.path / ENGINES / file
        try:
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        except OSError as exc:
            hint = rebuild_hint(self.bundle, self.record)
            raise EngineError(f"{path}: cannot read it ({exc.strerror}); {hint}") from None
        if engine is None:
            raise EngineError(f"{path}: TensorRT cannot load this engine; {rebuild_hint(self.bundle, self.record)}")
        return engine

    def _open_decoder(self) -> None:
        """Contexts for both profiles and the buffers of the decode step, allocated once."""
        engine = self.engines["decoder"]
        self.prefill = self.runners["decoder"]
        self.step = Runner(self.cuda, engine, 1, self.stream)
        self.cache_names = [n for n in self.prefill.inputs if n.startswith("past_")]
        layer_max = dims(engine.get_tensor_profile_shape(self.cache_names[0], 0)[2])
        self.cache_shape = (len(self.cache_names) // 2, 2, *layer_max)
        self.max_capacity = layer_max[2]
        self.max_prefill = dims(engine.get_tensor_profile_shape("input_ids", 0)[2])[1]
        self.hidden_size = dims(engine.get_tensor_profile_shape("audio_embeds", 0)[2])[2]
        self.cache_itemsize = self.step.itemsize(self.cache_names[0])
        self.step_ids = self.cuda.pinned(1, np.int64)
        self.step_position = self.cuda.pinned(1, np.int64)
        self.next_token = self.cuda.pinned(1, np.int64)
        self.cache, self.capacity, self.graph = 0, 0, None
        self.owner: object | None = None
        self.last = self.step

    def encode(self, mel, frames, conv_frames):
        return self.runners["encoder"].run({"mel": mel, "frames": frames, "conv_frames": conv_frames})[0]

    def project(self, hidden):
        return self.runners["projector"].run({"hidden": hidden})[0]

    def begin(self, capacity: int, keep: int = 0, owner: object | None = None) -> int:
        """Allocate (or reuse) the device cache and capture the decode step for this capacity.

        A stream's cache (an `owner`) is kept while large enough, and grows with headroom under
        the `keep` rows it copies across.
        """
        keep = keep if owner is not None and owner is self.owner else 0
        self.owner = owner
        if capacity > self.max_capacity:
            raise EngineError(f"{self.bundle.path / ENGINES}: this request needs {capacity} cache rows and the "
                              f"engines hold {self.max_capacity} (built for {self.record['max_audio_s']:g} s of audio); "
                              f"rebuild for longer audio: `qasr build {self.bundle.path} --max-audio SECONDS`")
        wanted = capacity if owner is None else capacity + capacity // 2
        needed = min(-(-wanted // CAPACITY_STEP) * CAPACITY_STEP, self.max_capacity)
        if needed == self.capacity or (owner is not None and capacity <= self.capacity):
            return keep
        old, old_capacity = self.cache, self.capacity
        self.cache_shape = self.cache_shape[:4] + (needed,) + self.cache_shape[5:]
        nbytes = math.prod(self.cache_shape) * self.cache_itemsize
        self.cache, self.capacity = self.cuda.malloc(nbytes), needed
        self.cuda.zero(self.cache, nbytes, self.stream)
        if old:
            if keep:
                self.cuda.write_rows(self.cache, old, prefix_copy(self.cache_shape, old_capacity, keep,
                                                                  self.cache_itemsize), self.stream)
            self.cuda.sync(self.stream)
            self.cuda.free(old)
            self.cuda.call(self.cuda.rt.cudaGraphExecDestroy(self.graph))
        self._bind_cache(self.prefill)
        self._capture_step()
        return keep

    def _bind_cache(self, runner: Runner) -> None:
        layer_shape = self.cache_shape[2:]
        block = math.prod(layer_shape) * self.cache_itemsize
        for i, name in enumerate(self.cache_names):  # layer-major, K then V: the cache's own order
            runner.context.set_input_shape(name, layer_shape)
            runner.context.set_tensor_address(name, self.cache + i * block)

    def _capture_step(self) -> None:
        """Fix the step's shapes and addresses, warm it up once, then record it as a CUDA graph."""
        step = self.step
        self._bind_cache(step)
        step.bind_shapes({"input_ids": (1, 1), "audio_embeds": (1, 1, self.hidden_size), "position": (1,)})
        self.cuda.zero(step.buffers["audio_embeds"][0], step.buffers["audio_embeds"][1], self.stream)

        def enqueue() -> None:
            self.cuda.to_device(step.buffers["input_ids"][0], self.step_ids, self.stream)
            self.cuda.to_device(step.buffers["position"][0], self.step_position, self.stream)
            if not step.context.execute_async_v3(int(self.stream)):
                raise EngineError("TensorRT failed to execute the decode step")
            self.cuda.to_host(self.next_token, step.buffers["next_token"][0], self.stream)

        self.step_ids[0] = self.step_position[0] = 0
        enqueue()  # TensorRT initialises lazily on the first enqueue after a shape change
        self.cuda.sync(self.stream)
        self.graph = self.cuda.capture(self.stream, enqueue)

    def decode(self, input_ids, audio_embeds, position):
        new = input_ids.shape[1]
        if position + new > self.capacity:
            raise EngineError(f"decode at {position}+{new} past the cache capacity {self.capacity} (call begin first)")
        if new == 1:
            self.step_ids[0], self.step_position[0] = input_ids[0, 0], position
            self.cuda.launch(self.graph, self.stream)
            runner = self.step
        else:
            runner = self._prefill(input_ids, audio_embeds, position)
        rows = runner.buffers["new_kv"][0]
        rows_shape = self.cache_shape[:4] + (new,) + self.cache_shape[5:]
        self.cuda.write_rows(self.cache, rows, row_copy(self.cache_shape, rows_shape, position, self.cache_itemsize),
                             self.stream)
        self.cuda.sync(self.stream)
        self.last = runner
        return int(self.next_token[0])

    def _prefill(self, input_ids: np.ndarray, audio_embeds: np.ndarray, position: int) -> Runner:
        if input_ids.shape[1] > self.max_prefill:
            raise EngineError(f"a prefill chunk of {input_ids.shape[1]} tokens exceeds the engine's {self.max_prefill}")
        runner = self.prefill
        feeds: dict[str, np.ndarray] = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                                         "audio_embeds": np.ascontiguousarray(audio_embeds, dtype=np.float32),
                                         "position": np.array([position], dtype=np.int64)}
        runner.bind_shapes({name: tuple(array.shape) for name, array in feeds.items()})
        for name, array in feeds.items():
            self.cuda.to_device(runner.buffers[name][0], array, self.stream)
        if not runner.context.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT failed to execute the prefill")
        self.cuda.to_host(self.next_token, runner.buffers["next_token"][0], self.stream)
        return runner

    def logits(self):
        runner = self.last
        out = np.empty(dims(runner.context.get_tensor_shape("logits")), dtype=np.float32)
        self.cuda.to_host(out, runner.buffers["logits"][0], self.stream)
        self.cuda.sync(self.stream)
        return out[0]

    def align(self, input_ids, audio_embeds):
        classes, logits = self.runners["aligner"].run({"input_ids": input_ids, "audio_embeds": audio_embeds})
        return classes, logits
