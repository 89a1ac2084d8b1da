"""Continuous batching: many requests share each decoder step.

A decode step reads every weight once whether it serves one sequence or eight, so on a
memory-bound machine eight sequences cost little more than one. Requests wait in a queue, join
the running batch at the next step (each prefilled alone: prefill is compute-bound, batching it
buys little) and leave at their end of sequence or budget, up to `max_batch` at a time.

The KV cache is one block shared by the batch (docs/graphs.md): each request owns a region of it
sized by its own prompt and budget, placed first-fit among the regions of the others, so a long
recording beside short ones does not make every row as long as the longest. The block grows when
a request finds no room and is sized afresh when the batch is empty. A backend with one cache
slot per batch row (the fused decoder: `slots = True`) gets `Slots` instead: the lowest free slot,
its memory still its own rows (qasr.runtime.backends.onnxruntime_fused); a free slot below the highest one
in use runs as an idle row of each step.

A stream (a Sequence with an `owner`) keeps its region between its steps: its next step re-decodes
a prompt that only grew or changed at its end, so the rows of the unchanged part are reused
instead of prefilled again, whether the stream runs alone or beside other requests. One engine
owns a backend's cache: an engine that finds another one used the backend since its own last
step drops those kept regions.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Generator
from typing import TypeVar

import numpy as np

from qasr.errors import QasrError
from qasr.runtime.backends.interface import Backend
from qasr.runtime.decode import PREFILL_CHUNK, Decoded, Sequence

ALIGN = 64  # region sizes (so starts and the cache's size) are multiples of this many rows


class Regions:
    """First-fit placement of requests' cache regions [start, start + rows) in the shared cache.

    Sizes round up to ALIGN rows, so every cache a row sees is a multiple of ALIGN long: then its
    scores meet the same SIMD lanes of ONNX Runtime's softmax as when it runs alone (the new key's
    score sits right after the cache), and the fp32 logits of a batched row are bit-identical to
    those of the request alone, not merely close (measured; with unrounded sizes they differ in
    the last bits, enough to flip a near-tie of a random model).
    """

    def __init__(self) -> None:
        self.taken: dict[int, int] = {}  # start -> rows

    def place(self, rows: int) -> int:
        rows = -(-rows // ALIGN) * ALIGN
        start = 0
        for begin in sorted(self.taken):
            if begin - start >= rows:
                break
            start = begin + self.taken[begin]
        self.taken[start] = rows
        return start

    def grow(self, start: int, rows: int) -> bool:
        """Make the region at `start` at least `rows` long in place, if the rows past it are free."""
        rows = max(-(-rows // ALIGN) * ALIGN, self.taken[start])
        following = [begin for begin in self.taken if begin > start]
        if following and min(following) < start + rows:
            return False
        self.taken[start] = rows
        return True

    def release(self, start: int) -> None:
        del self.taken[start]

    @property
    def end(self) -> int:
        return max((start + rows for start, rows in self.taken.items()), default=0)

    def fits(self, reserved) -> bool:
        """Whether a cache of `reserved` rows (the backend's `reserved`) holds every region."""
        return self.end <= reserved


class Slots:
    """Placement for backends with one cache slot per batch row (the fused decoder,
    qasr.runtime.backends.onnxruntime_fused): the lowest free slot, and every slot as long as the longest
    request placed (rounded up to ALIGN rows). The same calls as Regions; a "start" is a slot."""

    def __init__(self) -> None:
        self.taken: dict[int, int] = {}  # slot -> rows

    def place(self, rows: int) -> int:
        slot = next(i for i in range(len(self.taken) + 1) if i not in self.taken)
        self.taken[slot] = rows
        return slot

    def grow(self, slot: int, rows: int) -> bool:
        self.taken[slot] = max(rows, self.taken[slot])
        return True

    def release(self, slot: int) -> None:
        del self.taken[slot]

    @property
    def end(self) -> tuple[int, int]:
        """(slots, rows per slot) the cache needs."""
        rows = max(self.taken.values(), default=0)
        return max(self.taken, default=-1) + 1, -(-rows // ALIGN) * ALIGN

    def fits(self, reserved) -> bool:
        slots, rows = self.end
        return slots <= reserved[0] and rows <= reserved[1]


class BatchDecoder:
    """The decode loop of a batch of `Sequence`s on one backend; `step()` until `idle`.

    The engine owns the backend's cache while it has requests: one engine (and one thread) drives
    a backend at a time; a server feeds its requests to one engine with `add` between steps.

    >>> engine = BatchDecoder(backend, max_batch=8)
    >>> engine.add(sequence)            # joins at the next step
    >>> while not engine.idle:
    ...     for done in engine.step():  # finished (or failed: done.error) sequences
    ...         print(done.result.tokens)
    """

    def __init__(self, backend: Backend, max_batch: int, prefill_chunk: int = PREFILL_CHUNK):
        self.backend, self.max_batch, self.prefill_chunk = backend, max_batch, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.starts: dict[int, int] = {}  # id(sequence) -> its region's first row
        self.kept: dict[int, tuple[weakref.ref, int]] = {}  # id(owner) -> (owner, region) kept between its steps
        self.regions = self._placement()
        self.rows = backend.reserved  # what the backend's cache holds

    def _placement(self) -> Regions | Slots:
        return Slots() if getattr(self.backend, "slots", False) else Regions()

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running)

    @property
    def active(self) -> int:
        """Requests waiting or running: what a caller keeping the batch full compares to max_batch."""
        return len(self.waiting) + len(self.running)

    def release(self, owner: object) -> None:
        """Free the region kept for `owner` (a stream that ended). A stream that is dropped without
        ending is freed too, at the next admission after it is collected."""
        kept = self.kept.pop(id(owner), None)
        if kept is not None:
            self.regions.release(kept[1])

    def clear(self) -> None:
        """Drop every request and kept region (after a failure in the middle of a step: nothing is known good)."""
        self.waiting.clear()
        self.running, self.starts, self.kept, self.regions = [], {}, {}, self._placement()

    def cancel(self, sequence: Sequence, error: QasrError) -> Sequence:
        """Between steps: drop a request (its client left) with `error`; its rows are free at once."""
        if sequence in self.waiting:
            self.waiting.remove(sequence)
            sequence.error, sequence.done = error, True
            return sequence
        self.running.remove(sequence)
        return self._fail(sequence, error)

    def run(self) -> list[Sequence]:
        """Step until every added request has finished; the sequences in the order they did."""
        finished = []
        while not self.idle:
            finished += self.step()
        return finished

    def step(self) -> list[Sequence]:
        """Admit waiting requests into free rows, then one decode step of the batch.

        Returns the sequences that finished here: at an end-of-sequence id, at their budget, or
        with `error` set when the backend refused them (the others go on).
        """
        finished = self._admit()
        if self.running:
            began = time.perf_counter()
            batch = self.running
            ids = np.array([s.token for s in batch], dtype=np.int64)
            positions = np.array([s.position for s in batch], dtype=np.int64)
            starts = np.array([self.starts[id(s)] for s in batch], dtype=np.int64)
            try:
                tokens = self.backend.step(ids, starts, positions)
            except QasrError as exc:  # nothing is known to be good about any row now
                self._forget_kept()
                return finished + [self._fail(s, exc) for s in self._drain()]
            logits = self.backend.step_logits() if any(s.keep_logits for s in batch) else None
            spent = time.perf_counter() - began
            for row, sequence in enumerate(batch):
                sequence.position += 1
                sequence.result.decode_seconds += spent
                sequence.accept(int(tokens[row]), logits[row] if logits is not None and sequence.keep_logits else None)
            finished += [self._leave(s) for s in batch if s.done]
            self.running = [s for s in batch if not s.done]
        return finished

    def _admit(self) -> list[Sequence]:
        """Place the newcomers' regions, size the cache once for them all, prefill each alone."""
        joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.running)))]
        if not joining:
            return []
        began = time.perf_counter()
        if self.backend.holder is not self:  # another engine used the cache: nothing kept is there now
            self._forget_kept()
            self.backend.holder = self
        self._forget_kept(dead_only=True)
        fresh = not self.running and not self.kept  # no row is in use: size the cache for the newcomers alone
        for sequence in joining:
            self.starts[id(sequence)] = self._place(sequence)
        if fresh or not self.regions.fits(self.rows):
            try:
                self.backend.reserve(self.regions.end, keep=not fresh)
                self.rows = self.backend.reserved
            except QasrError as exc:  # no room for them (an engine's fixed cache): they fail, the batch goes on
                return [self._fail(sequence, exc) for sequence in joining]
        setup = time.perf_counter() - began
        finished = []
        for sequence in joining:
            sequence.result.setup_seconds += setup
            try:
                sequence.prefill(self.backend, self.starts[id(sequence)], self.prefill_chunk)
            except QasrError as exc:
                finished.append(self._fail(sequence, exc))
                continue
            if sequence.done:
                finished.append(self._leave(sequence))
            else:
                self.running.append(sequence)
        return finished

    def _place(self, sequence: Sequence) -> int:
        """The request's region. A stream's step goes back into the region its last step left, grown
        in place where the rows past it are free, and reuses its rows [0, keep); elsewhere it
        prefills in full. A stream's region has half again its size as headroom, since each step
        is a little longer than the last."""
        owner = sequence.owner
        kept = self.kept.pop(id(owner), None) if owner is not None else None
        if kept is not None:
            if self.regions.grow(kept[1], sequence.capacity):
                sequence.kept = sequence.keep
                return kept[1]
            self.regions.release(kept[1])
        rows = sequence.capacity
        return self.regions.place(rows + rows // 2 if owner is not None else rows)

    def _leave(self, sequence: Sequence) -> Sequence:
        start = self.starts.pop(id(sequence))
        if sequence.owner is not None and sequence.error is None:
            self.kept[id(sequence.owner)] = weakref.ref(sequence.owner), start
        else:
            self.regions.release(start)
        return sequence

    def _fail(self, sequence: Sequence, error: QasrError) -> Sequence:
        sequence.error, sequence.done = error, True
        return self._leave(sequence)

    def _forget_kept(self, dead_only: bool = False) -> None:
        """Free kept regions: all of them, or those of streams that were collected without ending."""
        for key, (owner, start) in list(self.kept.items()):
            if not dead_only or owner() is None:
                del self.kept[key]
                self.regions.release(start)

    def _drain(self) -> list[Sequence]:
        batch, self.running = self.running, []
        return batch


Result = TypeVar("Result")


def decode_alone(engine: BatchDecoder, sequence: Sequence) -> Decoded:
    """One request on an engine with no other work (a batch of one); raises the error it met."""
    engine.add(sequence)
    engine.run()
    if sequence.error:
        raise sequence.error
    return sequence.result


def run_steps(engine: BatchDecoder, steps: Generator[Sequence, None, Result]) -> Result:
    """Drive work that yields decoder requests one at a time (a stream's steps) on an engine with
    no other work; each request is decoded before the work resumes. Returns what the work returns."""
    try:
        sequence = next(steps)
        while True:
            engine.add(sequence)
            engine.run()
            sequence = next(steps)
    except StopIteration as stop:
        return stop.value


def greedy_decode(backend: Backend, prompt: list[int], audio_embeds: np.ndarray, audio_token: int,
                  budget: int, eos_ids: tuple[int, ...], keep_logits: bool = False,
                  on_token: Callable[[int], None] | None = None, prefill_chunk: int = PREFILL_CHUNK,
                  forced: list[int] | None = None) -> Decoded:
    """Greedy ids after `prompt`, whose `audio_token` rows take `audio_embeds` [N, hidden] in order,
    on an engine of its own. `forced` (teacher forcing, for `qasr verify`): feed these ids instead
    of the greedy choices."""
    sequence = Sequence(prompt, audio_embeds, audio_token, budget, eos_ids, keep_logits, on_token, forced=forced)
    return decode_alone(BatchDecoder(backend, max_batch=1, prefill_chunk=prefill_chunk), sequence)
