"""Whole recordings and streams' steps through one batch engine: `transcribe_many` and the server.

The engine (qasr.runtime.batch) steps decoder requests; this module keeps it full. A recording
is prepared (read, cut into parts) by `open`; its parts are encoded and join the engine as rows
free up; when its last part ends it is finished (parsed, aligned, joined) at once, so a short
request beside long ones is answered as soon as it is done. A stream's steps (`open_steps`) join
the engine one at a time, each as the one before it ends, so streams and recordings whose steps
coincide share them. One thread drives a Batcher (a backend is not thread-safe); the server adds
work between steps.

The model is reached through three public calls (Pipeline), so the batch path runs exactly the
pieces `Transcriber.transcribe` runs one recording at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qasr.errors import QasrError
from qasr.runtime.batch import BatchDecoder
from qasr.runtime.decode import Decoded, Sequence
from qasr.runtime.options import TranscribeOptions
from qasr.runtime.results import Transcript


@dataclass
class Recording:
    """One recording on its way through: its parts, and what decoding them has given so far."""

    audio: object
    name: str | None
    wave: np.ndarray
    forced: str | None           # the checked language the options force, or None
    start: float                 # perf_counter when it was taken
    options: TranscribeOptions
    error: QasrError | None = None
    parts: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (samples, offset in seconds)
    decoded: list[Decoded | None] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    running: int = 0  # parts in the engine
    on_token: Callable[[int], None] | None = None
    gone: Callable[[], bool] | None = None
    result: Transcript | QasrError | None = None  # once finished

    @property
    def complete(self) -> bool:
        return not self.running and (self.error is not None or all(d is not None for d in self.decoded))


@dataclass
class Steps:
    """A stream's steps on their way through the batch."""

    steps: Generator[Sequence, None, object]
    gone: Callable[[], bool] | None = None
    result: object = None
    complete: bool = False


class Pipeline(Protocol):
    """What the Batcher needs of a model (Transcriber is one)."""

    @property
    def engine(self) -> BatchDecoder: ...

    def prepare(self, audio, options: TranscribeOptions) -> Recording: ...

    def request(self, recording: Recording, index: int) -> Sequence: ...

    def finish(self, recording: Recording) -> Transcript: ...


class Batcher:
    """Keeps one BatchDecoder full, from whole recordings and from streams' steps."""

    def __init__(self, model: Pipeline, max_batch: int):
        self.model = model
        self.engine = model.engine
        self.engine.max_batch = max_batch
        self.parts: deque[tuple[Recording, int]] = deque()  # parts of opened recordings not yet in the engine
        self.owners: dict[int, tuple[Recording | Steps, int, Sequence]] = {}  # id(sequence) -> its work, part, itself
        self.jobs: list[Recording | Steps] = []  # opened and not yet finished

    @property
    def idle(self) -> bool:
        return not self.jobs

    def open(self, audio, options: TranscribeOptions, on_token: Callable[[int], None] | None = None,
             gone: Callable[[], bool] | None = None) -> Recording:
        """Take a recording; `gone()` true drops it between steps. A recording that cannot be read
        is taken too, and finishes at the next step with its error."""
        recording = self.model.prepare(audio, options)
        recording.on_token, recording.gone = on_token, gone
        self.parts.extend((recording, index) for index in range(len(recording.parts)))
        self.jobs.append(recording)
        return recording

    def open_steps(self, steps: Generator[Sequence, None, object], gone: Callable[[], bool] | None = None) -> Steps:
        """Take work that yields decoder requests one at a time (Stream.feed_steps or finish_steps);
        its `result` is what the work returns, or the error it raised."""
        job = Steps(steps, gone)
        self.jobs.append(job)
        self._advance(job)
        return job

    def fill(self) -> bool:
        """Encode waiting parts into free rows; whether a row is still free (room for another recording)."""
        while self.engine.active < self.engine.max_batch and self.parts:
            recording, index = self.parts.popleft()
            if recording.error:
                continue
            try:
                sequence = self.model.request(recording, index)
            except QasrError as exc:
                recording.error = exc
                continue
            sequence.on_token = recording.on_token
            self.owners[id(sequence)] = recording, index, sequence
            recording.running += 1
            self.engine.add(sequence)
        return self.engine.active < self.engine.max_batch

    def step(self) -> list[Recording | Steps]:
        """Fill free rows, drop work whose client left, one decode step; the work finished here,
        each with its `result` (a Transcript, a stream's events, or the error it met)."""
        self.fill()
        for job, _, sequence in list(self.owners.values()):
            if job.gone and job.gone():
                self._retire(self.engine.cancel(sequence, QasrError("the client went away")))
        for sequence in self.engine.step():
            self._retire(sequence)
        done = [job for job in self.jobs if job.complete]
        for job in done:
            self.jobs.remove(job)
            if isinstance(job, Recording):
                job.result = job.error or self._finish(job)
        return done

    def _finish(self, recording: Recording) -> Transcript | QasrError:
        try:
            return self.model.finish(recording)
        except QasrError as exc:
            return exc

    def _retire(self, sequence: Sequence) -> None:
        job, index, _ = self.owners.pop(id(sequence))
        if isinstance(job, Steps):
            self._advance(job)
            return
        job.running -= 1
        job.error = job.error or sequence.error
        job.decoded[index] = sequence.result

    def _advance(self, job: Steps) -> None:
        """Resume the work (its last request is decoded) up to its next request, or its end."""
        try:
            sequence = next(job.steps)
        except StopIteration as stop:
            job.result, job.complete = stop.value, True
            return
        except QasrError as exc:
            job.result, job.complete = exc, True
            return
        self.owners[id(sequence)] = job, -1, sequence
        self.engine.add(sequence)
