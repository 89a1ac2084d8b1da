"""ONNX Runtime's CUDA provider over a fused bundle: a decode step of about 13 nodes per layer,
all on the GPU, replayed as a CUDA graph.

The fused decoder (docs/graphs.md, "decoder (fused)") is derived in fp16 or bf16 on first use
(GroupQueryAttention's CUDA kernels take no other type; qasr.export.precision). The cache is one
device allocation [layers, 2, slots, kvh, P, hd] in the graph's type; a call over slots [0, b)
binds each layer's K and V at the address of that block, as past and present at once, so the
attention op appends rows in place and nothing is copied between calls.

A decode step runs at a bucket of slots (BUCKETS: the highest slot in use, rounded up). Its
inputs (ids, `seqlens_k`) are device values of its own, bound once and refreshed with
`update_inplace` (a host array bound once is copied once: see qasr.runtime.backends.onnxruntime_cuda);
`total_sequence_length`, which the op reads on the host, is the cache's P, the same every step;
the greedy id comes out of the graph's ArgMax, so only ids cross to the host. With those fixed
addresses ONNX Runtime captures the step as a CUDA graph the first time a bucket runs
(`enable_cuda_graph`, one `gpu_graph_id` per bucket and cache) and replays it after. A prefill
runs outside any graph (`gpu_graph_id` -1).

Unlike the CPU's lazily committed mapping, device memory is committed: the cache only grows (P
at least doubles, slots go up a bucket), so that a bucket's graph is captured once per cache, and
it holds `slots x P` rows at its high-water mark. An idle row (a free slot in the bucket, or a
stream's kept slot) appends one row past its own, as on the CPU (qasr.runtime.backends.onnxruntime_fused).

`device="cpu"` runs the same binding on the CPU provider, without CUDA graphs: how it is tested
on a machine without a GPU, against the CPU backend's ids.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from qasr.errors import EngineError, UsageError
from qasr.progress import Progress
from qasr.runtime.backends import onnxruntime_cuda
from qasr.runtime.backends.interface import Backend
from qasr.runtime.backends.onnxruntime_cuda import PROVIDERS, OnnxRuntimeCudaBackend
from qasr.runtime.backends.onnxruntime_fused import SPARE_ROWS, SlotRows, check_contract
from qasr.runtime.bundle import Bundle
from qasr.runtime.resolve import derive_graphs

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # the batch sizes a decode step runs at: one captured graph each
FUSED_GPU_AUTO = "fp16"  # what `--precision auto` runs: the fp16 derivation is the one checked on a CPU here


class OnnxRuntimeCudaFusedBackend(OnnxRuntimeCudaBackend):
    slots = True

    def __init__(self, bundle: Bundle, precision: str = FUSED_GPU_AUTO, device: str = "cuda", device_id: int = 0,
                 threads: int | None = None, cuda_graph: bool = True, background_load: bool = True):
        if device == "cuda" and precision not in ("fp16", "bf16"):
            raise UsageError(f"a fused decoder runs fp16 or bf16 on the GPU (GroupQueryAttention's CUDA kernels), "
                             f"not {precision}")
        self.cuda_graph = cuda_graph and device == "cuda"
        super().__init__(bundle, precision=precision, provider="cuda", device=device, device_id=device_id,
                         threads=threads, background_load=background_load)
        self.max_rows = bundle.model["text"]["max_position_embeddings"] - SPARE_ROWS  # the rope tables' length
        self.written = SlotRows()
        self.calls: dict[int, FusedDeviceCall] = {}  # bucket -> the decode step's bound values
        self.graph_ids = itertools.count(1)  # ORT keeps a captured graph per id: a new cache takes new ids
        self.last_call: tuple[FusedDeviceCall, np.ndarray] | None = None

    def _session(self, name: str) -> ort.InferenceSession:
        if name != "decoder" or not self.cuda_graph:
            return super()._session(name)
        cuda = (PROVIDERS["cuda"], {"device_id": self.device_id, "enable_cuda_graph": "1"})
        return self._open(name, [cuda, "CPUExecutionProvider"])

    @property
    def reserved(self):
        if self.cache_value is None:
            return (0, 0)
        shape = self.cache_value.shape()
        return (shape[2], shape[4] - SPARE_ROWS)

    def reserve(self, size, keep: bool = True) -> None:
        """`size` = (slots, rows per slot). Grows only: slots to a bucket, rows at least doubling."""
        slots, rows = size
        if rows > self.max_rows:
            raise EngineError(f"a request of {rows} rows is past the model's {self.max_rows + SPARE_ROWS} positions")
        have_slots, have_rows = self.reserved
        if slots <= have_slots and rows <= have_rows:
            return
        slots = max(have_slots, next((b for b in BUCKETS if b >= slots), slots))
        rows = min(self.max_rows, max(rows, 2 * have_rows))
        layers, two, _, heads, _, dim = self.cache_shape
        shape = (layers, two, slots, heads, rows + SPARE_ROWS, dim)
        old, old_array = self.cache_value, self.cache
        self.cache_value, self.cache = self._zeros(shape, self.cache_type, self.itemsize)
        self.calls = {}
        if keep and old is not None:
            self._keep(old, old_array)
        else:
            self.written = SlotRows()

    def _keep(self, old: ort.OrtValue, old_array: np.ndarray | None) -> None:
        """Every slot's rows of the old cache into the new one (the same slots, longer or more)."""
        layers, two, slots, heads, rows, dim = old.shape()
        if self.cache is not None and old_array is not None:
            self.cache[:, :, :slots, :, :rows] = old_array
            return
        new_slots, new_rows = self.cache_value.shape()[2], self.cache_value.shape()[4]
        size = self.itemsize
        for block in range(layers * two):  # one 2-D copy per layer and kind: slots x heads lines of rows
            source = old.data_ptr() + block * slots * heads * rows * dim * size
            offset = block * new_slots * heads * new_rows * dim * size
            geometry = (offset, new_rows * dim * size, rows * dim * size, rows * dim * size, slots * heads)
            self.cuda.write_rows(self.cache_value.data_ptr(), source, geometry, self.stream)
        self.cuda.sync(self.stream)

    def _bind(self, batch: int, new: int, first: int, audio: ort.OrtValue, total: int) -> FusedDeviceCall:
        """A decoder call over slots [first, first + batch): inputs of its own, cache blocks in place."""
        vocab = self.graphs["decoder"]["outputs"]["logits"]["shape"][1]
        call = FusedDeviceCall(self._input(np.zeros((batch, new), dtype=np.int64)),
                               self._input(np.zeros(batch, dtype=np.int32)),
                               self._zeros((batch,), np.int64, 8), self._zeros((batch, vocab), np.float32)[0],
                               self.sessions["decoder"].io_binding(), None)
        binding = call.binding
        binding.bind_ortvalue_input("input_ids", call.ids)
        binding.bind_ortvalue_input("seqlens_k", call.seqlens)
        binding.bind_ortvalue_input("audio_embeds", audio)
        total_value = ort.OrtValue.ortvalue_from_numpy(np.array(total, np.int32))  # read on the host by the op
        binding.bind_ortvalue_input("total_sequence_length", total_value)
        self._bind_slots(binding, first, batch)
        binding.bind_ortvalue_output("next_token", call.next_token[0])
        binding.bind_ortvalue_output("logits", call.logits)
        return call

    def _bind_slots(self, binding: ort.IOBinding, first: int, batch: int) -> None:
        """Each layer's K and V for slots [first, first + batch): one contiguous block, past and present."""
        layers, two, slots, heads, rows, dim = self.cache_value.shape()
        block = [batch, heads, rows, dim]
        for index in range(layers * two):
            layer, kind = divmod(index, 2)
            names = [f"{role}_{('key', 'value')[kind]}_{layer}" for role in ("past", "present")]
            if self.cache is not None:
                value = ort.OrtValue.ortvalue_from_numpy(self.cache[layer, kind, first : first + batch])
                binding.bind_ortvalue_input(names[0], value)
                binding.bind_ortvalue_output(names[1], value)
                continue
            pointer = self.cache_value.data_ptr() + (index * slots + first) * heads * rows * dim * self.itemsize
            binding.bind_input(names[0], "cuda", self.device_id, self.cache_type, block, pointer)
            binding.bind_output(names[1], "cuda", self.device_id, self.cache_type, block, pointer)

    def _run(self, call: FusedDeviceCall) -> np.ndarray:
        self.sessions["decoder"].run_with_iobinding(call.binding, call.options)
        value, array = call.next_token
        return array if array is not None else value.numpy()

    def prefill(self, input_ids, audio_embeds, start, position):
        """`start` is the request's slot; its rows before `position` are already in the cache."""
        new = input_ids.shape[1]
        self.written.check(self.reserved, start, position + new)
        audio = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(audio_embeds, dtype=np.float32),
                                                 self.device, self.device_id)
        call = self._bind(1, new, start, audio, position + new)
        call.ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        call.seqlens.update_inplace(np.array([position + new - 1], dtype=np.int32))
        call.options = self._graph_options(-1)
        token = self._run(call)
        self.written.wrote(start, position + new)
        self.last_call = (call, np.zeros(1, dtype=np.int64))
        return int(token[0])

    def step(self, ids, starts, positions):
        starts, positions = np.asarray(starts), np.asarray(positions)
        for slot, position in zip(starts, positions):
            self.written.check(self.reserved, int(slot), int(position) + 1)
        slots = self.reserved[0]
        batch = min(slots, next((b for b in BUCKETS if b > int(starts.max())), slots))
        if batch not in self.calls:
            audio = self._zeros((batch, 1, self.hidden_size), np.float32)[0]
            self.calls[batch] = self._bind(batch, 1, 0, audio, self.cache_value.shape()[4])
            self.calls[batch].options = self._graph_options(next(self.graph_ids))
        call = self.calls[batch]
        feed_ids = np.zeros((batch, 1), dtype=np.int64)
        feed_ids[starts, 0] = ids
        call.ids.update_inplace(feed_ids)
        call.seqlens.update_inplace(self.written.step_seqlens(batch, starts, positions))
        tokens = self._run(call)
        for slot, position in zip(starts, positions):
            self.written.wrote(int(slot), int(position) + 1)
        self.last_call = (call, starts)
        return tokens[starts].copy()

    def _graph_options(self, graph_id: int) -> ort.RunOptions | None:
        """Run options naming the CUDA graph a call captures or replays (-1: none)."""
        if not self.cuda_graph:
            return None
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def step_logits(self):
        assert self.last_call is not None, "no decoder call yet"
        call, rows = self.last_call
        return call.logits.numpy()[rows]


@dataclass
class FusedDeviceCall:
    """A bound fused decoder call: its device inputs, the greedy ids (value, and host array on the
    CPU device), the logits left on the device, the binding and its run options."""

    ids: ort.OrtValue
    seqlens: ort.OrtValue
    next_token: tuple[ort.OrtValue, np.ndarray | None]
    logits: ort.OrtValue
    binding: ort.IOBinding
    options: ort.RunOptions | None


def usable(bundle: Bundle) -> bool:
    """An fp32 fused bundle (the quantized ones run on the CPU) where the CUDA provider can run."""
    return not bundle.manifest.get("weights") and onnxruntime_cuda.device_usable()


def load(bundle: Bundle, threads: int | None, precision: str, progress: Progress,
         background_load: bool = True) -> Backend:
    """The fused decoder derived in `precision` (auto: FUSED_GPU_AUTO) on first use."""
    check_contract(bundle)
    if bundle.manifest.get("weights"):
        raise UsageError(f"{bundle.path}: its {bundle.manifest['precision']} fused decoder runs on the CPU; on the GPU "
                         "run the fp32 fused bundle it came from (fp16 or bf16 graphs are derived from it)")
    chosen = FUSED_GPU_AUTO if precision == "auto" else precision
    if chosen == "fp32":
        raise UsageError("a fused decoder runs fp16 or bf16 on the GPU (GroupQueryAttention's CUDA kernels): "
                         "--precision fp16 or bf16")
    onnxruntime_cuda.require_cuda_provider()
    derive_graphs(bundle, chosen, progress)
    return OnnxRuntimeCudaFusedBackend(bundle, precision=chosen, threads=threads, background_load=background_load)
