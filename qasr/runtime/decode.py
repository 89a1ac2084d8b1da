"""The greedy decoding loop, written once for every backend.

The prompt is prefilled in chunks (bounded attention memory for 20-minute prompts), each chunk
carrying the audio embeddings of the <|audio_pad|> rows it contains; then one token at a time
until an end-of-sequence id or the budget. The KV cache is sized once for prompt + budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qasr.runtime.backend import Backend

PREFILL_CHUNK = 512


@dataclass
class Decoded:
    tokens: list[int]            # generated ids, end-of-sequence excluded
    stopped: bool                # an end-of-sequence id ended the run (False: the budget did)
    logits: list[np.ndarray] = field(default_factory=list)  # per step, only when asked for
    setup_seconds: float = 0.0   # backend.begin: the cache, and on a first call a decoder still loading
    prefill_seconds: float = 0.0


def token_budget(seconds: float) -> int:
    """Default generation budget: 32 plus 10 tokens per second of audio.

    Fast speech reads at 4-6 text tokens a second, so a fixed budget (the official 512) silently
    cuts long recordings; this one grows with the audio and still bounds a degenerate loop.
    """
    return 32 + math.ceil(10 * seconds)


def greedy_decode(backend: Backend, prompt: list[int], audio_embeds: np.ndarray, audio_token: int,
                  budget: int, eos_ids: tuple[int, ...], keep_logits: bool = False,
                  on_token: Callable[[int], None] | None = None, prefill_chunk: int = PREFILL_CHUNK,
                  keep: int = 0, owner: object | None = None, forced: list[int] | None = None) -> Decoded:
    """Greedy ids after `prompt`, whose `audio_token` rows take `audio_embeds` [N, hidden] in order.

    `keep`, `owner`: a stream's step, whose prompt[:keep] is unchanged since `owner`'s last call;
    the backend keeps those cache rows (Backend.begin) and only the rest is prefilled.
    `forced` (teacher forcing, for `qasr verify`): feed these ids instead of the greedy choices, one
    step each, and stop after them; `tokens` are still what the model chose at every step.
    """
    budget = len(forced) if forced is not None else budget
    began = time.perf_counter()
    kept = backend.begin(len(prompt) + budget, min(keep, len(prompt) - 1), owner)
    ids = np.asarray(prompt, dtype=np.int64)[None]
    is_audio = ids[0] == audio_token
    audio_before = np.concatenate([[0], np.cumsum(is_audio)])
    filler = np.zeros((1, 1, audio_embeds.shape[1]), dtype=np.float32)
    start = time.perf_counter()
    for begin in range(kept, len(prompt), prefill_chunk):
        end = min(begin + prefill_chunk, len(prompt))
        rows = audio_embeds[audio_before[begin] : audio_before[end]]
        token = backend.decode(ids[:, begin:end], rows[None] if len(rows) else filler, begin)
    result = Decoded([], stopped=False, setup_seconds=start - began, prefill_seconds=time.perf_counter() - start)
    step = np.zeros((1, 1), dtype=np.int64)
    position = len(prompt)
    while True:
        if keep_logits:
            result.logits.append(backend.logits().copy())
        if token in eos_ids and forced is None:
            result.stopped = True
            return result
        result.tokens.append(token)
        if on_token:
            on_token(token)
        if len(result.tokens) == budget:
            return result
        step[0, 0] = token if forced is None else forced[len(result.tokens) - 1]
        token = backend.decode(step, filler, position)
        position += 1
