"""Greedy decoding of one request, written once for every backend and for batches.

The prompt is prefilled in chunks (bounded attention memory for 20-minute prompts), each chunk
carrying the audio embeddings of the <|audio_pad|> rows it contains; then one token per step
until an end-of-sequence id or the budget. `Sequence` holds that per-request logic; the batch
engine (qasr.runtime.batch) steps many of them at once; its `greedy_decode` is the one-row case.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qasr.errors import QasrError
from qasr.runtime.backends.interface import Backend

PREFILL_CHUNK = 512
LOOP_REPEATS = 20  # the official repetition fix's threshold (qwen_asr.inference.utils.detect_and_fix_repetitions)
LOOP_PERIOD = 20   # longest loop watched, in ids (the fix's longest pattern is 20 characters)


@dataclass
class Decoded:
    tokens: list[int]            # generated ids, end-of-sequence excluded
    stopped: bool                # an end-of-sequence id ended the run (False: the budget did)
    logits: list[np.ndarray] = field(default_factory=list)  # per step, only when asked for
    setup_seconds: float = 0.0   # the cache, and on a first call a decoder still loading
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # the steps while the request was in the batch (with others' prefills)
    loop_from: int | None = None  # where the loop guard took over: tokens from here on were not decoded


def token_budget(seconds: float) -> int:
    """Default generation budget: 32 plus 10 tokens per second of audio.

    Fast speech reads at 4-6 text tokens a second, so a fixed budget (the official 512) silently
    cuts long recordings; this one grows with the audio and still bounds a degenerate loop.
    """
    return 32 + math.ceil(10 * seconds)


class LoopGuard:
    """Watches greedy ids for a loop: the last `repeats` x q ids are one run of q ids repeated.

    Greedy decoding of long audio falls into such loops and often stays in them to the budget
    (QwenLM/Qwen3-ASR #129), where the official repetition fix then cuts the text to one copy.
    `period` returns q once a loop has run `repeats` times (at the fix's threshold), and the
    sequence then writes the rest of its budget as the loop continued instead of decoding it: the
    same ids and text as decoding them whenever the loop would have held to the budget. That is a
    bet, not a certainty: a loop can end after 20 exact repeats (random test models leave runs of
    27 and 47 identical ids), and the text after it is then lost, so the guard is opt-in.
    One counter per period, updated per id: O(LOOP_PERIOD) a step.
    """

    def __init__(self, repeats: int = LOOP_REPEATS, longest: int = LOOP_PERIOD):
        self.repeats, self.runs = repeats, [0] * (longest + 1)  # runs[q]: trailing ids equal to the id q before

    def period(self, tokens: list[int]) -> int | None:
        for q in range(1, len(self.runs)):
            self.runs[q] = self.runs[q] + 1 if len(tokens) > q and tokens[-1] == tokens[-1 - q] else 0
        return next((q for q in range(1, len(self.runs)) if self.runs[q] >= (self.repeats - 1) * q), None)


class Sequence:
    """One request's greedy state: prompt, budget, end-of-sequence ids, the ids so far.

    `prefill` runs the prompt into the request's cache region and takes the first id; each decode
    step then feeds `token` at `position` and hands the next id to `accept`, until `done`.

    `owner` and `keep`: a stream re-decodes a prompt that grows at its end. The engine keeps the
    owner's cache region between its requests, so rows [0, keep) of it still hold the unchanged
    prompt prefix and only the rest is prefilled (the engine decides: `kept`).
    `forced`: teacher forcing (`qasr verify`): these ids are fed instead of the greedy choices,
    one step each, end-of-sequence ids included; `tokens` are still what the model chose.
    `loop_guard`: end a repetition loop early, its ids continued to the budget (LoopGuard).
    """

    def __init__(self, prompt: list[int], audio_embeds: np.ndarray, audio_token: int, budget: int,
                 eos_ids: tuple[int, ...], keep_logits: bool = False,
                 on_token: Callable[[int], None] | None = None, keep: int = 0, owner: object | None = None,
                 forced: list[int] | None = None, loop_guard: bool = False):
        self.prompt, self.audio_embeds, self.audio_token = prompt, audio_embeds, audio_token
        self.budget = len(forced) if forced is not None else budget
        self.eos_ids, self.keep_logits, self.on_token = eos_ids, keep_logits, on_token
        self.keep, self.owner, self.forced = min(keep, len(prompt) - 1), owner, forced
        self.kept = 0  # prompt rows the cache already held, as the engine found them
        self.result = Decoded([], stopped=False)
        self.position = len(prompt)  # where `token` goes
        self.token = -1
        self.done = False
        self.error: QasrError | None = None
        self.guard = LoopGuard() if loop_guard and forced is None else None

    @property
    def capacity(self) -> int:
        """Cache rows the request can fill: its prompt and its budget."""
        return len(self.prompt) + self.budget

    def prefill(self, backend: Backend, start: int, chunk: int = PREFILL_CHUNK) -> None:
        begun = time.perf_counter()
        ids = np.asarray(self.prompt, dtype=np.int64)[None]
        audio_before = np.concatenate([[0], np.cumsum(ids[0] == self.audio_token)])
        filler = np.zeros((1, 1, self.audio_embeds.shape[1]), dtype=np.float32)
        for begin in range(self.kept, len(self.prompt), chunk):
            end = min(begin + chunk, len(self.prompt))
            rows = self.audio_embeds[audio_before[begin] : audio_before[end]]
            token = backend.prefill(ids[:, begin:end], rows[None] if len(rows) else filler, start, begin)
        self.result.prefill_seconds = time.perf_counter() - begun
        self.accept(token, backend.step_logits()[0] if self.keep_logits else None)

    def accept(self, token: int, logits: np.ndarray | None) -> None:
        """Take the greedy id that follows the last fed one (and its logits, when kept)."""
        if logits is not None:
            self.result.logits.append(logits.copy())
        if token in self.eos_ids and self.forced is None:
            self.result.stopped = self.done = True
            return
        self.result.tokens.append(token)
        if self.on_token:
            self.on_token(token)
        self.token = token if self.forced is None else self.forced[len(self.result.tokens) - 1]
        self.done = len(self.result.tokens) == self.budget
        period = self.guard.period(self.result.tokens) if self.guard and not self.done else None
        if period:
            self.result.loop_from = len(self.result.tokens)
            while len(self.result.tokens) < self.budget:
                self.result.tokens.append(self.result.tokens[-period])
                if self.on_token:
                    self.on_token(self.result.tokens[-1])
            self.done = True
