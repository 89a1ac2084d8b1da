"""ONNX Runtime backend: the fp32 graphs on the CPU (or any execution provider ORT offers).

The decoder runs through IO binding over buffers allocated once: the KV cache is one numpy array
[L, 2, 1, kvh, P, hd] shared by every request (each in its own region of rows), whose per-layer
K and V blocks ORT reads in place as its past_key_i / past_value_i inputs, and a decode step's
inputs and outputs are bound once per batch size, so a decoded token allocates nothing. New K/V
rows come back as an output and are copied into the cache at their rows (the portable contract
that TensorRT 10.3 also runs).

Memory (docs/benchmarks.md, "The 1.7B on a small machine"): the graphs that run once per clip
(encoder, projector, aligner) run without ONNX Runtime's arena, which would keep their largest
activations for the life of the process, and with the C library returning freed blocks at once
(qasr.memory.return_freed_memory); the decoder keeps its arena, so a decode step reuses its
buffers, but a prefill, whose activations are many times a step's, shrinks it again afterwards.
While a session is made and once it is, the pages it still maps of the bundle's data files (the
scales ORT keeps beside packed weights that hold them too) leave the resident set
(qasr.memory.dropping_file_pages).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from qasr.errors import BundleError, EngineError, UsageError, first_line
from qasr.memory import dropping_file_pages, return_freed_memory, trim_heap
from qasr.progress import Progress
from qasr.runtime.backends.interface import Backend
from qasr.runtime.backends.prepack import prepacked_graph
from qasr.runtime.bundle import Bundle, cache_names

ARENA_GRAPHS = ("decoder",)  # run every token: they keep ONNX Runtime's arena


def session_options(threads: int | None, optimize: bool = True, arena: bool = True) -> ort.SessionOptions:
    """`optimize=False` for prepacked copies (qasr.runtime.backends.prepack), which are optimised already;
    `arena=False` for graphs run once per clip, whose activations are then freed after each call."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if _shared_pool:
        options.use_per_session_threads = False  # the size is the process pool's (share_threads)
        return options
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    return options


_shared_pool = False  # whether this process's sessions run in ORT's global pools (share_threads)
PER_SESSION = "QASR_THREAD_POOL"  # =per-session keeps one pool per session even where a command would share one


def share_threads(threads: int | None) -> None:
    """Run every ONNX Runtime session qasr opens from now on in one process-wide pool of `threads`.

    A recording alternates graphs (encoder, projector, decoder: every stream step, every request a
    server adds between decode steps), and with a pool per session the workers of the graph that just
    ran keep spinning on the cores the next one needs: two decoders stepping in turn on 2 cores took
    28-32 ms a step each on their own pools, 15-16 ms on one (docs/benchmarks.md, "One thread pool
    per process", for streams and batches).

    Only for a process qasr owns (its commands and server replicas call this): once the pool exists,
    ONNX Runtime refuses every session of the process made without use_per_session_threads=False,
    other code's included. So the library never makes it on its own, and `QASR_THREAD_POOL=per-session`
    opts out. Where other code of the process made the pools already, qasr's sessions join them
    (ORT allows nothing else then), at that code's size.
    """
    global _shared_pool
    if _shared_pool or os.environ.get(PER_SESSION) == "per-session":
        return
    try:
        ort.set_global_thread_pool_sizes(threads or 0, 1)  # 0: ORT's default, a thread per core
    except Exception:  # ORT's Fail: the pools exist already, and then they are the only ones allowed
        pass
    _shared_pool = True


class Sessions:
    """Graph name -> ONNX Runtime session. The large graph (decoder or aligner) loads in a
    background thread, so its seconds of weight packing overlap the audio's frontend and encoder
    instead of adding to the time to the first token; a load error surfaces on first use.

    With `background=False` it loads on first use instead: after the audio is encoded, so that a
    process that frees the encoder then (release) never holds both graphs' weights. On 2 cores the
    overlap gains little, as the loads and the encoder share the same cores: a one-shot 10 s with
    the fused 1.7B int4 peaked at 1.17 GB instead of 1.41-1.48, its first result 0.2-0.4 s later
    (docs/benchmarks.md, "The 1.7B on a small machine").
    """

    LARGE = ("decoder", "aligner")

    def __init__(self, load: Callable[[str], ort.InferenceSession], names: list[str], background: bool = True):
        self.load = load
        self.pending = {}
        if background:
            pool = ThreadPoolExecutor(max_workers=1)
            self.pending = {name: pool.submit(load, name) for name in names if name in self.LARGE}
            pool.shutdown(wait=False)
        self.ready = {name: load(name) for name in names if name not in self.LARGE}

    def __getitem__(self, name: str) -> ort.InferenceSession:
        if name not in self.ready:
            self.ready[name] = self.pending.pop(name).result() if name in self.pending else self.load(name)
        return self.ready[name]

    def release(self, names: tuple[str, ...]) -> None:
        """Drop these loaded sessions (their packed weights leave with them); a later use loads one again."""
        for name in names:
            self.ready.pop(name, None)
        trim_heap()


class OnnxRuntimeBackend(Backend):
    name, device_label = "onnxruntime", "CPU"

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list | None = None,
                 background_load: bool = True):
        self.bundle = bundle
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.shrink = arena_shrink() if self.providers == ["CPUExecutionProvider"] else None
        return_freed_memory()
        self.sessions = Sessions(self._session, list(bundle.manifest["graphs"]), background_load)
        model = bundle.model["text"]
        self.cache_shape = (model["num_hidden_layers"], 2, 1, model["num_key_value_heads"], 0, model["head_dim"])
        self.hidden_size = model["hidden_size"]
        self.cache: np.ndarray | None = None
        self.steps: dict[int, Call] = {}  # batch size -> the decode step's bound buffers
        self.last: Call | None = None

    def _session(self, name: str) -> ort.InferenceSession:
        """The graph's prepacked copy where one was made on this kind of machine, else the graph."""
        prepacked = prepacked_graph(self.bundle, name) if self.providers == ["CPUExecutionProvider"] else None
        path = prepacked or self.bundle.graph_path(name)
        options = session_options(self.threads, optimize=not prepacked, arena=name in ARENA_GRAPHS)
        try:
            with self._dropping(name, bool(prepacked)):
                return ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types, all with a message
            reason = first_line(exc)
            if "multiple hard links" in reason:  # ONNX's guard on a subgraph's weights (the encoder's Scan)
                reason = "ONNX refuses weight files with several hard links: copy the bundle instead of linking it"
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({reason})") from None

    def _dropping(self, name: str, prepacked: bool):
        """What of the graph's data files leaves the resident set as its session is made: nothing of a
        prepacked copy, whose mapped weights are the packed ones, read at every call; for a quantized
        graph, the scales and zero points ONNX Runtime keeps mapped, every 0.1 s while it packs; for
        an fp32 graph, what is left mapped at the end (qasr.memory.dropping_file_pages)."""
        if prepacked:
            return nullcontext()
        quantized = name in self.bundle.manifest.get("weights", {})
        return dropping_file_pages(self.bundle.data_paths(name), every=0.1 if quantized else None)

    def release(self, graphs):
        self.sessions.release(graphs)

    def encode(self, mel, frames, conv_frames):
        return self.sessions["encoder"].run(None, {"mel": mel, "frames": frames, "conv_frames": conv_frames})[0]

    def project(self, hidden):
        return self.sessions["projector"].run(None, {"hidden": hidden})[0]

    def reserve(self, rows: int, keep: bool = True) -> None:
        self.sessions["decoder"]  # a first call waits here for the decoder still loading: setup, not prefill
        if self.cache is not None and self.cache.shape[4] == rows:
            return
        layers, two, one, heads, _, dim = self.cache_shape
        cache = np.zeros((layers, two, one, heads, rows, dim), dtype=np.float32)
        if keep and self.cache is not None:
            kept = min(rows, self.cache.shape[4])
            cache[:, :, :, :, :kept] = self.cache[:, :, :, :, :kept]
        self.cache, self.steps = cache, {}

    def _call(self, ids: np.ndarray, audio: np.ndarray, positions: np.ndarray, starts: np.ndarray,
              past: list[np.ndarray]) -> Call:
        """Bind a decoder call with its own output buffers."""
        layers, two, _, heads, _, dim = self.cache_shape
        batch, new = ids.shape
        vocab = self.bundle.manifest["graphs"]["decoder"]["outputs"]["logits"]["shape"][1]
        call = Call(ids, starts, positions, np.zeros(batch, dtype=np.int64), np.zeros((batch, vocab), dtype=np.float32),
                    np.zeros((batch, layers, two, heads, new, dim), dtype=np.float32), self.sessions["decoder"].io_binding())
        inputs = zip(["input_ids", "audio_embeds", "position", "cache_start", *cache_names(layers)],
                     [ids, audio, positions, starts, *past])
        for name, array in inputs:
            call.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for name, array in (("next_token", call.next_token), ("logits", call.logits), ("new_kv", call.rows)):
            call.binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        return call

    def _blocks(self) -> list[np.ndarray]:
        """Each layer's K and V as it is bound: a contiguous block [1, kvh, P, hd] of the cache."""
        assert self.cache is not None, "reserve the cache first"
        return [self.cache[layer, kind] for layer in range(len(self.cache)) for kind in (0, 1)]

    def prefill(self, input_ids, audio_embeds, start, position):
        """The chunk reads copies of only the request's filled rows, not the whole shared cache:
        attention over empty or other requests' rows would cost it seconds per chunk."""
        new = input_ids.shape[1]
        self._check_rows(start + position + new)
        past = [np.ascontiguousarray(block[:, :, start : start + position]) for block in self._blocks()]
        call = self._call(np.ascontiguousarray(input_ids, dtype=np.int64),
                          np.ascontiguousarray(audio_embeds, dtype=np.float32),
                          np.array([position], dtype=np.int64), np.zeros(1, dtype=np.int64), past)
        self.sessions["decoder"].run_with_iobinding(call.binding, self.shrink)
        assert self.cache is not None
        self.cache[:, :, 0, :, start + position : start + position + new] = call.rows[0]
        self.last = call
        return int(call.next_token[0])

    def step(self, ids, starts, positions):
        batch = len(ids)
        rows = np.asarray(starts) + np.asarray(positions)
        self._check_rows(int(rows.max()) + 1)
        if batch not in self.steps:
            self.steps[batch] = self._call(np.zeros((batch, 1), dtype=np.int64),
                                           np.zeros((batch, 1, self.hidden_size), dtype=np.float32),
                                           np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64),
                                           self._blocks())
        call = self.steps[batch]
        call.ids[:, 0], call.starts[:], call.positions[:] = ids, starts, positions
        self.sessions["decoder"].run_with_iobinding(call.binding)
        assert self.cache is not None
        for b, row in enumerate(rows):
            self.cache[:, :, 0, :, row] = call.rows[b, :, :, :, 0]
        self.last = call
        return call.next_token.copy()

    @property
    def reserved(self) -> int:
        """Rows the shared cache holds."""
        return 0 if self.cache is None else self.cache.shape[4]

    def _check_rows(self, end: int) -> None:
        if end > self.reserved:
            raise EngineError(f"decoder call up to cache row {end} past the {self.reserved} reserved")

    def step_logits(self):
        assert self.last is not None, "no decoder call yet"
        return self.last.logits

    def align(self, input_ids, audio_embeds):
        classes, logits = self.sessions["aligner"].run(None, {"input_ids": input_ids, "audio_embeds": audio_embeds})
        return classes, logits


@dataclass
class Call:
    """A bound decoder call: its host buffers (read and written in place by ORT) and the binding."""

    ids: np.ndarray
    starts: np.ndarray
    positions: np.ndarray
    next_token: np.ndarray
    logits: np.ndarray
    rows: np.ndarray
    binding: ort.IOBinding


def arena_shrink() -> ort.RunOptions:
    """Run options that hand the CPU arena's free regions back after the call (a prefill's)."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def usable(bundle: Bundle) -> bool:
    """The CPU provider is in every onnxruntime wheel: the last choice of `auto`, always there."""
    return True


def load(bundle: Bundle, threads: int | None, precision: str, progress: Progress,
         background_load: bool = True) -> Backend:
    """The bundle's own graphs; a GPU compute type is refused here rather than silently ignored."""
    if precision not in ("auto", "fp32"):
        raise UsageError(f"--precision {precision} is for the GPU backends (onnxruntime-cuda, tensorrt); on the "
                         "CPU, smaller weights come from `qasr export --weights int8|int4`")
    return OnnxRuntimeBackend(bundle, threads=threads, background_load=background_load)
