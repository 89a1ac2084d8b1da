"""ONNX Runtime backend for the fused decoder graph (qasr.export.fused_decoder; docs/graphs.md).

The cache is one slot per request: per layer and kind a block [slots, kvh, P, hd], of which a
batch binds its first `n` slots as GroupQueryAttention's past and present buffers at once, so
the op reads and appends K/V rows in place (no new_kv output, no host copy). A decode step runs
every slot up to the highest one in use. A slot that is free, or kept for a stream between its
steps, is an idle row: it "appends" one row past the rows it holds, which is free by definition
(each slot has one row more than `reserve` was asked for, so even a full slot has it). ONNX
Runtime 1.31's GroupQueryAttention, the CUDA build's, has no per-row count of new tokens that
could leave a row out.

Each request's memory is still sized by its own need: the block is an anonymous mapping whose
pages the kernel supplies on first write (MAP_NORESERVE: the address space of `slots x P` rows
is not committed), and a request writes only its own rows, so a 10 s clip beside a 20-minute one
holds the clip's rows, not the recording's. The mapping is made afresh when the batch empties.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from qasr.errors import BundleError, EngineError, UsageError
from qasr.progress import Progress
from qasr.runtime.backends.interface import Backend
from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend
from qasr.runtime.bundle import Bundle

MAP_NORESERVE = 0x4000  # Linux's flag (Python's mmap module names it only from 3.13)
SPARE_ROWS = 1  # per slot, past the reserved rows: where a full slot's idle row writes


def _mapped_zeros(shape: tuple[int, ...]) -> tuple[np.ndarray, mmap.mmap | None]:
    """Zeros in pages that are allocated on first write; plain np.zeros where mmap cannot do it."""
    size = int(np.prod(shape)) * 4
    if not size:
        return np.zeros(shape, dtype=np.float32), None
    try:
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    except (OSError, ValueError, AttributeError):
        return np.zeros(shape, dtype=np.float32), None
    return np.frombuffer(block, dtype=np.float32).reshape(shape), block


class SlotRows:
    """The rows each cache slot holds, as both fused backends (this one and the CUDA one) keep them:
    what a grown cache keeps, the bounds every call is checked against, and where an idle row's
    step writes."""

    def __init__(self) -> None:
        self.filled: dict[int, int] = {}  # slot -> rows written

    def check(self, reserved: tuple[int, int], slot: int, end: int) -> None:
        slots, rows = reserved
        if slot >= slots or end > rows:
            raise EngineError(f"decoder call up to row {end} of slot {slot}, past the {slots} x {rows} reserved")

    def wrote(self, slot: int, end: int) -> None:
        self.filled[slot] = max(self.filled.get(slot, 0), end)

    def step_seqlens(self, batch: int, starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """`seqlens_k` of a step over slots [0, batch): a stepping slot's position; an idle row the
        rows its slot holds, so that its step appends one row past them, which nothing reads."""
        seqlens = np.array([self.filled.get(slot, 0) for slot in range(batch)], dtype=np.int32)
        seqlens[starts] = positions
        return seqlens


class OnnxRuntimeFusedBackend(OnnxRuntimeBackend):
    """The CPU (or any ORT provider's) backend over a fused bundle; `starts` are slot indices."""

    slots = True

    def __init__(self, bundle, threads: int | None = None, providers: list | None = None,
                 background_load: bool = True):
        super().__init__(bundle, threads, providers, background_load)
        self.mapping: mmap.mmap | None = None
        self.written = SlotRows()
        self.logits: np.ndarray | None = None
        self.calls: dict[int, FusedCall] = {}  # batch size -> the decode step's bound buffers

    def reserve(self, size, keep: bool = True) -> None:
        """`size` = (slots, rows per slot), as qasr.runtime.batch.Slots computes it."""
        slots, rows = size
        if self.cache is not None and self.reserved == (slots, rows):
            return
        layers, two, _, heads, _, dim = self.cache_shape
        cache, mapping = _mapped_zeros((layers, two, slots, heads, rows + SPARE_ROWS, dim))
        if keep and self.cache is not None:
            for slot, filled in self.written.filled.items():
                if slot < slots:
                    cache[:, :, slot, :, :min(filled, rows)] = self.cache[:, :, slot, :, :min(filled, rows)]
        self.written.filled = {s: f for s, f in self.written.filled.items() if keep and s < slots}
        self.cache, self.mapping, self.calls = cache, mapping, {}

    @property
    def reserved(self):
        return (0, 0) if self.cache is None else (self.cache.shape[2], self.cache.shape[4] - SPARE_ROWS)

    def _bind(self, batch: int, new: int, first: int = 0) -> FusedCall:
        """A decoder call over slots [first, first + batch) with its own host buffers."""
        assert self.cache is not None, "reserve the cache first"
        layers = self.cache_shape[0]
        vocab = self.bundle.manifest["graphs"]["decoder"]["outputs"]["logits"]["shape"][1]
        call = FusedCall(np.zeros((batch, new), dtype=np.int64), np.zeros((batch, 1, self.hidden_size), np.float32),
                         np.zeros(batch, dtype=np.int32), np.zeros((), dtype=np.int32), np.zeros(batch, dtype=np.int64),
                         np.zeros((batch, vocab), dtype=np.float32), self.sessions["decoder"].io_binding())
        inputs = {"input_ids": call.ids, "audio_embeds": call.audio, "seqlens_k": call.seqlens,
                  "total_sequence_length": call.total}
        for name, array in inputs.items():
            call.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for layer in range(layers):
            for kind, label in enumerate(("key", "value")):
                block = ort.OrtValue.ortvalue_from_numpy(self.cache[layer, kind, first : first + batch])
                call.binding.bind_ortvalue_input(f"past_{label}_{layer}", block)
                call.binding.bind_ortvalue_output(f"present_{label}_{layer}", block)
        call.binding.bind_ortvalue_output("next_token", ort.OrtValue.ortvalue_from_numpy(call.next_token))
        call.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(call.logits))
        return call

    def prefill(self, input_ids, audio_embeds, start, position):
        """`start` is the request's slot; its rows before `position` are already in the cache."""
        new = input_ids.shape[1]
        self.written.check(self.reserved, start, position + new)
        call = self._bind(1, new, first=start)
        call.ids[:] = input_ids
        call.binding.bind_ortvalue_input("audio_embeds", ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(audio_embeds, dtype=np.float32)))
        call.seqlens[0], call.total[()] = position + new - 1, position + new
        self.sessions["decoder"].run_with_iobinding(call.binding, self.shrink)
        self.written.wrote(start, position + new)
        self.logits = call.logits
        return int(call.next_token[0])

    def step(self, ids, starts, positions):
        starts, positions = np.asarray(starts), np.asarray(positions)
        for slot, position in zip(starts, positions):
            self.written.check(self.reserved, int(slot), int(position) + 1)
        batch = int(starts.max()) + 1
        if batch not in self.calls:
            self.calls[batch] = self._bind(batch, 1)
        call = self.calls[batch]
        call.ids[:] = 0
        call.ids[starts, 0], call.seqlens[:] = ids, self.written.step_seqlens(batch, starts, positions)
        call.total[()] = int(call.seqlens.max()) + 1
        self.sessions["decoder"].run_with_iobinding(call.binding)
        for slot, position in zip(starts, positions):
            self.written.wrote(int(slot), int(position) + 1)
        self.logits = call.logits[starts]
        return call.next_token[starts]

    def step_logits(self):
        assert self.logits is not None, "no decoder call yet"
        return self.logits


@dataclass
class FusedCall:
    """A bound fused decoder call: host buffers that ORT reads and writes in place, and the binding."""

    ids: np.ndarray
    audio: np.ndarray
    seqlens: np.ndarray
    total: np.ndarray
    next_token: np.ndarray
    logits: np.ndarray
    binding: ort.IOBinding


def check_contract(bundle: Bundle) -> None:
    """Fused decoders exported before the graph dropped `query_seqlens` (to load in ONNX Runtime
    1.31) cannot be bound by these backends: one line saying how to get a current one."""
    if "query_seqlens" in bundle.manifest["graphs"]["decoder"]["inputs"]:
        raise BundleError(f"{bundle.path}: its fused decoder was exported by an earlier qasr; export it again "
                          "(qasr export CHECKPOINT --out DIR --decoder fused)")


def load(bundle: Bundle, threads: int | None, precision: str, progress: Progress,
         background_load: bool = True) -> Backend:
    """A fused bundle (its decoder has one cache slot per row) on the CPU provider."""
    check_contract(bundle)
    if precision not in ("auto", "fp32"):
        raise UsageError(f"--precision {precision} is for the GPU backends; a fused bundle runs on the CPU")
    return OnnxRuntimeFusedBackend(bundle, threads=threads, background_load=background_load)
