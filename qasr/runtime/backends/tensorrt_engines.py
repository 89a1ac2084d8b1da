"""TensorRT backend: the engines `qasr build` compiled into the bundle, the KV cache on the GPU.

One device cache [L, 2, 1, kvh, P, hd] in the engine's own type (bf16 for a bf16 build) shared by
the batch's requests, each in its own rows, zeroed once, each layer's K and V bound as a block of
it (past_key_i, past_value_i), and written in place: a request's new K/V rows go in with one
strided device-to-device copy (cudaMemcpy2DAsync: L*2*kvh rows of S*hd elements at pitch P*hd).
A prefill chunk reads a copy of only its request's filled rows (so the prefill profile stays
one request long). A decode step of B requests runs the CUDA graph of the smallest batch-size
bucket (1, 2, 4, ... up to the engine's batch) that holds them, captured once per bucket and
cache size, padded rows at position 0 whose outputs are dropped: three copies from pinned host
memory (ids, positions, cache starts), execute_async_v3, and the greedy ids (argmax in the
graph) copied back; logits cross only when asked. One stream, one execution context per
optimization profile (the decoder's prefill and decode profiles), no allocation per token.

tensorrt and cuda-python (`cuda.bindings.runtime`) are imported here only, and lazily, so that
qasr.runtime imports without them. The TensorRT calls follow the documented Python API:
set_input_shape, set_tensor_address, execute_async_v3, set_optimization_profile_async.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from qasr.errors import EngineError
from qasr.jsonfile import read_json
from qasr.progress import Progress
from qasr.runtime.backends.cuda import Cuda, row_copy
from qasr.runtime.backends.interface import Backend
from qasr.runtime.bundle import ENGINES, ENGINES_RECORD, Bundle

if TYPE_CHECKING:
    import tensorrt as trt

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
    file = bundle.path / ENGINES / ENGINES_RECORD
    if not file.is_file():
        raise EngineError(f"{bundle.path}: no TensorRT engines; build them with `qasr build {bundle.path}`")
    return read_json(file, EngineError, f"; {rebuild_hint(bundle)}")


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
    name, device_label = "tensorrt", "CUDA GPU (TensorRT)"

    def __init__(self, bundle: Bundle, precision: str = "auto"):
        self.bundle = bundle
        version = tensorrt_version()
        self.record = load_record(bundle)
        if precision not in ("auto", self.record.get("precision")):
            raise EngineError(f"{bundle.path / ENGINES}: the engines are {self.record.get('precision')}, not {precision}; "
                              f"{rebuild_hint(bundle, {**self.record, 'precision': precision})}")
        self.cuda = Cuda()
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
        self.prefill_runner = self.runners["decoder"]
        self.step_runner = Runner(self.cuda, engine, 1, self.stream)
        self.cache_names = [n for n in self.prefill_runner.inputs if n.startswith("past_")]
        layer_max = dims(engine.get_tensor_profile_shape(self.cache_names[0], 1)[2])
        self.cache_shape = (len(self.cache_names) // 2, 2, *layer_max)
        self.max_capacity = layer_max[2]  # rows of the shared cache: the engine's batch of longest requests
        self.max_request = dims(engine.get_tensor_profile_shape(self.cache_names[0], 0)[2])[2]
        self.max_prefill = dims(engine.get_tensor_profile_shape("input_ids", 0)[2])[1]
        self.max_batch = dims(engine.get_tensor_profile_shape("input_ids", 1)[2])[0]
        self.buckets = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i < self.max_batch] + [self.max_batch]
        self.hidden_size = dims(engine.get_tensor_profile_shape("audio_embeds", 0)[2])[2]
        self.cache_itemsize = self.step_runner.itemsize(self.cache_names[0])
        self.step_ids = self.cuda.pinned(self.max_batch, np.int64)
        self.step_positions = self.cuda.pinned(self.max_batch, np.int64)
        self.step_starts = self.cuda.pinned(self.max_batch, np.int64)
        self.next_tokens = self.cuda.pinned(self.max_batch, np.int64)
        self.cache, self.capacity = 0, 0
        self.graphs: dict[int, Any] = {}  # bucket -> the captured decode step
        self.scratch, self.scratch_bytes = 0, 0  # a prefill chunk's copy of its request's filled rows
        self.last, self.last_rows = self.step_runner, 1

    def encode(self, mel, frames, conv_frames):
        return self.runners["encoder"].run({"mel": mel, "frames": frames, "conv_frames": conv_frames})[0]

    def project(self, hidden):
        return self.runners["projector"].run({"hidden": hidden})[0]

    @property
    def reserved(self) -> int:
        return self.capacity

    def reserve(self, rows: int, keep: bool = True) -> None:
        """Allocate (or grow) the device cache; the decode graphs are captured again for its size."""
        needed = -(-rows // CAPACITY_STEP) * CAPACITY_STEP
        if rows > self.max_capacity:
            raise EngineError(f"{self.bundle.path / ENGINES}: the batch needs {rows} cache rows and the engines "
                              f"hold {self.max_capacity} (built for {self.record['max_audio_s']:g} s of audio, "
                              f"batch {self.max_batch}); rebuild: `qasr build {self.bundle.path} --max-audio SECONDS`")
        needed = min(needed, self.max_capacity)
        if needed == self.capacity:
            return
        old, old_shape = self.cache, self.cache_shape
        self.cache_shape = self.cache_shape[:4] + (needed,) + self.cache_shape[5:]
        nbytes = math.prod(self.cache_shape) * self.cache_itemsize
        self.cache, self.capacity = self.cuda.malloc(nbytes), needed
        self.cuda.zero(self.cache, nbytes, self.stream)
        if old and keep:
            kept = min(needed, old_shape[4])
            offset, pitch, _, width, height = row_copy(self.cache_shape, old_shape[:4] + (kept,) + old_shape[5:], 0,
                                                       self.cache_itemsize)
            self.cuda.write_rows(self.cache, old, (offset, pitch, old_shape[4] * old_shape[5] * self.cache_itemsize,
                                                   width, height), self.stream)
        self.cuda.sync(self.stream)
        if old:
            self.cuda.free(old)
        for graph in self.graphs.values():
            self.cuda.call(self.cuda.rt.cudaGraphExecDestroy(graph))
        self.graphs = {}
        self._bind_cache(self.step_runner, self.cache, self.cache_shape)
        self._size_step()

    def _bind_cache(self, runner: Runner, pointer: int, shape: tuple[int, ...]) -> None:
        layer_shape = shape[2:]
        block = math.prod(layer_shape) * self.cache_itemsize
        for i, name in enumerate(self.cache_names):  # layer-major, K then V: the cache's own order
            runner.context.set_input_shape(name, layer_shape)
            runner.context.set_tensor_address(name, pointer + i * block)

    def _size_step(self) -> None:
        """Bind the step's buffers at the largest bucket, so every bucket's graph uses the same addresses."""
        batch = self.max_batch
        self.step_runner.bind_shapes({"input_ids": (batch, 1), "audio_embeds": (batch, 1, self.hidden_size),
                                      "position": (batch,), "cache_start": (batch,)})
        self.cuda.zero(*self.step_runner.buffers["audio_embeds"], self.stream)

    def _graph(self, bucket: int) -> Any:
        """The decode step of `bucket` rows: shapes fixed, warmed up once, recorded as a CUDA graph."""
        if bucket in self.graphs:
            return self.graphs[bucket]
        step = self.step_runner
        for name, shape in (("input_ids", (bucket, 1)), ("audio_embeds", (bucket, 1, self.hidden_size)),
                            ("position", (bucket,)), ("cache_start", (bucket,))):
            step.context.set_input_shape(name, shape)

        def enqueue() -> None:
            for name, host in (("input_ids", self.step_ids), ("position", self.step_positions),
                               ("cache_start", self.step_starts)):
                self.cuda.to_device(step.buffers[name][0], host[:bucket], self.stream)
            if not step.context.execute_async_v3(int(self.stream)):
                raise EngineError("TensorRT failed to execute the decode step")
            self.cuda.to_host(self.next_tokens[:bucket], step.buffers["next_token"][0], self.stream)

        saved = [a.copy() for a in (self.step_ids, self.step_positions, self.step_starts)]
        self.step_ids[:] = self.step_positions[:] = self.step_starts[:] = 0
        enqueue()  # TensorRT initialises lazily on the first enqueue after a shape change
        self.cuda.sync(self.stream)
        self.graphs[bucket] = self.cuda.capture(self.stream, enqueue)
        self.step_ids[:], self.step_positions[:], self.step_starts[:] = saved
        return self.graphs[bucket]

    def step(self, ids, starts, positions):
        batch = len(ids)
        rows = np.asarray(starts) + np.asarray(positions)
        if batch > self.max_batch or int(rows.max()) >= self.capacity:
            raise EngineError(f"a decode step of {batch} rows up to cache row {int(rows.max())} exceeds the engine's "
                              f"batch {self.max_batch} or the {self.capacity} reserved rows")
        bucket = next(b for b in self.buckets if b >= batch)
        graph = self._graph(bucket)
        self.step_ids[:batch], self.step_positions[:batch], self.step_starts[:batch] = ids, positions, starts
        self.step_ids[batch:bucket] = self.step_positions[batch:bucket] = self.step_starts[batch:bucket] = 0
        self.cuda.launch(graph, self.stream)
        for b, row in enumerate(rows):
            self._write_rows(self.step_runner, b, 1, int(row))
        self.cuda.sync(self.stream)
        self.last, self.last_rows = self.step_runner, batch
        return self.next_tokens[:batch].copy()

    def _write_rows(self, runner: Runner, batch_row: int, new: int, cache_row: int) -> None:
        """Batch row `batch_row` of new_kv [B, L, 2, kvh, S, hd] into the cache at `cache_row`."""
        rows_shape = self.cache_shape[:4] + (new,) + self.cache_shape[5:]
        source = runner.buffers["new_kv"][0] + batch_row * math.prod(rows_shape) * self.cache_itemsize
        self.cuda.write_rows(self.cache, source, row_copy(self.cache_shape, rows_shape, cache_row, self.cache_itemsize),
                             self.stream)

    def prefill(self, input_ids, audio_embeds, start, position):
        new = input_ids.shape[1]
        if position + new > self.max_request:
            raise EngineError(f"{self.bundle.path / ENGINES}: this request needs more than the {self.max_request} cache "
                              f"rows the engines hold per request (built for {self.record['max_audio_s']:g} s of audio); "
                              f"rebuild for longer audio: `qasr build {self.bundle.path} --max-audio SECONDS`")
        if start + position + new > self.capacity:
            raise EngineError(f"prefill at {start}+{position}+{new} past the {self.capacity} reserved cache rows")
        if new > self.max_prefill:
            raise EngineError(f"a prefill chunk of {new} tokens exceeds the engine's {self.max_prefill}")
        runner = self.prefill_runner
        self._bind_cache(runner, self._filled_rows(start, position), self.cache_shape[:4] + (max(position, 1),)
                         + self.cache_shape[5:])
        feeds: dict[str, np.ndarray] = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                                         "audio_embeds": np.ascontiguousarray(audio_embeds, dtype=np.float32),
                                         "position": np.array([position], dtype=np.int64),
                                         "cache_start": np.zeros(1, dtype=np.int64)}
        runner.bind_shapes({name: tuple(array.shape) for name, array in feeds.items()})
        for name, array in feeds.items():
            self.cuda.to_device(runner.buffers[name][0], array, self.stream)
        if not runner.context.execute_async_v3(int(self.stream)):
            raise EngineError("TensorRT failed to execute the prefill")
        self.cuda.to_host(self.next_tokens[:1], runner.buffers["next_token"][0], self.stream)
        self._write_rows(runner, 0, new, start + position)
        self.cuda.sync(self.stream)
        self.last, self.last_rows = runner, 1
        return int(self.next_tokens[0])

    def _filled_rows(self, start: int, position: int) -> int:
        """A contiguous copy of rows start .. start+position-1 of the cache (at least one zero row)."""
        rows = max(position, 1)
        shape = self.cache_shape[:4] + (rows,) + self.cache_shape[5:]
        nbytes = math.prod(shape) * self.cache_itemsize
        if nbytes > self.scratch_bytes:
            if self.scratch:
                self.cuda.free(self.scratch)
            self.scratch, self.scratch_bytes = self.cuda.malloc(nbytes), nbytes
            self.cuda.zero(self.scratch, nbytes, self.stream)  # never NaN, even where masked
        if position:
            row = self.cache_shape[5] * self.cache_itemsize
            offset, _, _, width, height = row_copy(self.cache_shape, shape, start, self.cache_itemsize)
            self.cuda.write_rows(self.scratch, self.cache + offset, (0, rows * row, self.capacity * row, width, height),
                                 self.stream)
        return self.scratch

    def step_logits(self):
        runner = self.last
        out = np.empty(dims(runner.context.get_tensor_shape("logits")), dtype=np.float32)
        self.cuda.to_host(out, runner.buffers["logits"][0], self.stream)
        self.cuda.sync(self.stream)
        return out[: self.last_rows]

    def align(self, input_ids, audio_embeds):
        classes, logits = self.runners["aligner"].run({"input_ids": input_ids, "audio_embeds": audio_embeds})
        return classes, logits


def usable(bundle: Bundle) -> bool:
    """Engines built for this bundle, and TensorRT itself (tensorrt-stubs alone imports as an empty package)."""
    if not (bundle.path / ENGINES / ENGINES_RECORD).is_file():
        return False
    try:
        tensorrt_version()
    except EngineError:
        return False
    return True


def load(bundle: Bundle, threads: int | None, precision: str, progress: Progress,
         background_load: bool = True) -> Backend:
    """The engines at their own precision (`qasr build` chose it); `threads` is the CPU's, unused here,
    and `background_load` has nothing to defer: every engine is deserialized at once, into GPU memory."""
    return TensorRTBackend(bundle, precision)
