"""ONNX Runtime backend: the fp32 graphs on the CPU (or any execution provider ORT offers).

The decoder runs through IO binding over buffers allocated once per request: the KV cache is one
numpy array [L, 2, 1, kvh, P, hd] whose per-layer K and V blocks ORT reads in place as its
past_key_i / past_value_i inputs, and the decode step's inputs and outputs are bound once, so a
decoded token allocates nothing. New K/V rows come back as an output and are copied into the
cache at their position (the portable contract that TensorRT 10.3 also runs).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from qasr.errors import BundleError
from qasr.runtime.backend import Backend
from qasr.runtime.bundle import Bundle, cache_names
from qasr.runtime.prepack import prepacked_graph


def session_options(threads: int | None, optimize: bool = True) -> ort.SessionOptions:
    """`optimize=False` for prepacked copies (qasr.runtime.prepack), which are optimised already."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    return options


class Sessions:
    """Graph name -> ONNX Runtime session. The large graph (decoder or aligner) loads in a
    background thread, so its seconds of weight packing overlap the audio's frontend and encoder
    instead of adding to the time to the first token; a load error surfaces on first use."""

    BACKGROUND = ("decoder", "aligner")

    def __init__(self, load: Callable[[str], ort.InferenceSession], names: list[str]):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = {name: self.pool.submit(load, name) for name in names if name in self.BACKGROUND}
        self.ready = {name: load(name) for name in names if name not in self.BACKGROUND}
        self.pool.shutdown(wait=False)

    def __getitem__(self, name: str) -> ort.InferenceSession:
        if name not in self.ready:
            self.ready[name] = self.pending.pop(name).result()
        return self.ready[name]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list | None = None):
        self.bundle = bundle
        self.providers = providers or ["CPUExecutionProvider"]
        self.options = session_options(threads)
        self.threads = threads
        self.sessions = Sessions(self._session, list(bundle.manifest["graphs"]))
        model = bundle.model["text"]
        self.cache_shape = (model["num_hidden_layers"], 2, 1, model["num_key_value_heads"], 0, model["head_dim"])
        self.hidden_size = model["hidden_size"]
        self.cache: np.ndarray | None = None
        self.owner: object | None = None

    def _session(self, name: str) -> ort.InferenceSession:
        """The graph's prepacked copy where one was made on this kind of machine, else the graph."""
        prepacked = prepacked_graph(self.bundle, name) if self.providers == ["CPUExecutionProvider"] else None
        path = prepacked or self.bundle.graph_path(name)
        options = session_options(self.threads, optimize=False) if prepacked else self.options
        try:
            return ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types, all with a message
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None

    def encode(self, mel, frames, conv_frames):
        return self.sessions["encoder"].run(None, {"mel": mel, "frames": frames, "conv_frames": conv_frames})[0]

    def project(self, hidden):
        return self.sessions["projector"].run(None, {"hidden": hidden})[0]

    def begin(self, capacity: int, keep: int = 0, owner: object | None = None) -> int:
        """Allocate the cache and the decode step's bound buffers for this request.

        The cache is zero-filled, never np.empty: a masked row still meets a zero attention
        weight, and 0 x NaN from uninitialised memory would poison the output. A stream's cache
        (an `owner`) is kept while it is large enough and grows with headroom, so its steps
        rarely copy; stale rows past the kept ones are finite and masked.
        """
        layers, two, batch, heads, _, dim = self.cache_shape
        keep = keep if owner is not None and owner is self.owner else 0
        self.owner = owner
        size = self.cache.shape[4] if self.cache is not None else 0
        if size < capacity or (owner is None and size != capacity):
            old = self.cache
            rows = capacity if owner is None else capacity + capacity // 2
            self.cache = np.zeros((layers, two, batch, heads, rows, dim), dtype=np.float32)
            if keep:
                self.cache[:, :, :, :, :keep] = old[:, :, :, :, :keep]
        vocab = self.bundle.manifest["graphs"]["decoder"]["outputs"]["logits"]["shape"][1]
        self.step_ids = np.zeros((1, 1), dtype=np.int64)
        self.step_position = np.zeros(1, dtype=np.int64)
        self.step_audio = np.zeros((1, 1, self.hidden_size), dtype=np.float32)
        self.next_token = np.zeros(1, dtype=np.int64)
        self.last_logits = np.zeros((1, vocab), dtype=np.float32)
        self.step_rows = np.zeros((layers, two, batch, heads, 1, dim), dtype=np.float32)
        self.step_binding = self._bind(self.step_ids, self.step_audio, self.step_position, self.step_rows)
        return keep

    def _bind(self, ids, audio, position, rows, filled: int | None = None) -> ort.IOBinding:
        """Bind a decoder call. The decode step reads the whole cache in place (masked past
        `position`); a prefill chunk gets copies of only the `filled` rows, since attention over
        the empty capacity would cost it seconds per chunk, growing with the budget."""
        binding = self.sessions["decoder"].io_binding()
        blocks = (self.cache[layer, kind] for layer in range(len(self.cache)) for kind in (0, 1))
        layers = [block if filled is None else np.ascontiguousarray(block[:, :, :filled]) for block in blocks]
        inputs = zip(["input_ids", "audio_embeds", "position", *cache_names(len(self.cache))],
                     [ids, audio, position, *layers])
        for name, array in inputs:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for name, array in (("next_token", self.next_token), ("logits", self.last_logits), ("new_kv", rows)):
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        return binding

    def decode(self, input_ids, audio_embeds, position):
        new = input_ids.shape[1]
        if new == 1:
            self.step_ids[0, 0] = input_ids[0, 0]
            self.step_position[0] = position
            binding, rows = self.step_binding, self.step_rows
        else:
            rows = np.empty(self.step_rows.shape[:4] + (new, self.step_rows.shape[5]), dtype=np.float32)
            binding = self._bind(np.ascontiguousarray(input_ids, dtype=np.int64),
                                 np.ascontiguousarray(audio_embeds, dtype=np.float32),
                                 np.array([position], dtype=np.int64), rows, filled=position)
        self.sessions["decoder"].run_with_iobinding(binding)
        self.cache[:, :, :, :, position : position + new] = rows
        return int(self.next_token[0])

    def logits(self):
        return self.last_logits[0]

    def align(self, input_ids, audio_embeds):
        classes, logits = self.sessions["aligner"].run(None, {"input_ids": input_ids, "audio_embeds": audio_embeds})
        return classes, logits
