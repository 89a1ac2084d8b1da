"""The one model in memory, the bounded queue in front of it, and the server's metrics.

Inference runs on one worker thread, which alone drives the backend (it is not thread-safe, and
ONNX Runtime or TensorRT already uses every core it is given). That thread keeps one continuous
batch (qasr.runtime.transcribe.Batcher): a request's audio is encoded and joins the running
batch at the next decode step, up to --max-batch at a time, and leaves at its end of sequence, so
concurrent requests share each step's read of the weights. Requests past those rows wait in a
queue bounded by --max-queue; past it they are refused at once (429) rather than piling up
memory, and a client that leaves is dropped (before any work is spent on it when still queued).
Realtime sessions' steps join the same batch (each step one request, as its stream's previous
step ends), so streams and file requests whose steps coincide share them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qasr.errors import QasrError
from qasr.runtime.align import Aligner
from qasr.runtime.audio import SAMPLE_RATE
from qasr.runtime.batcher import Batcher
from qasr.runtime.options import TranscribeOptions
from qasr.runtime.transcribe import Transcriber

log = logging.getLogger("qasr.serve")
STAGES = ("queue", "audio", "frontend", "encoder", "setup", "prefill", "decode", "align", "total")


@dataclass
class Options:
    """What `qasr serve` was started with (the CLI flags, one for one)."""

    model: str
    aligner: str | None = None
    backend: str = "auto"
    threads: int | None = None
    precision: str = "auto"
    weights: str = "fp32"  # a checkpoint's cached export (qasr.runtime.resolve)
    encoder_weights: str = "fp32"
    api_key: str | None = None
    max_upload_mb: float = 100.0
    max_queue: int = 16
    max_batch: int = 8
    max_new_tokens: int | None = None
    cors_origins: list[str] = field(default_factory=list)
    drain_seconds: int = 30


class Busy(Exception):
    """The queue is full (429) or the server cannot take work now (503); carries the reason."""

    def __init__(self, status: int, message: str, code: str, retry_after: int = 1):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class Disconnected(Exception):
    """The client left while its request waited: nothing was computed for it."""


class Metrics:
    """Prometheus series of one server (its own registry, so two servers in a process never mix)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("qasr_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.audio_seconds = Counter("qasr_audio_seconds", "seconds of audio transcribed", registry=self.registry)
        self.tokens = Counter("qasr_tokens", "tokens generated", registry=self.registry)
        self.queue_depth = Gauge("qasr_queue_depth", "requests admitted and not finished (waiting or running)",
                                 registry=self.registry)
        self.stage_seconds = Histogram("qasr_stage_seconds", "seconds per pipeline stage", ["stage"],
                                       buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
                                       registry=self.registry)
        self.dropped = Counter("qasr_dropped", "queued requests dropped because their client left",
                               registry=self.registry)
        self.realtime_sessions = Gauge("qasr_realtime_sessions", "open realtime WebSocket sessions",
                                       registry=self.registry)
        self.batch_size = Histogram("qasr_batch_size", "requests sharing each decode step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=self.registry)

    def record(self, transcript, queued: float) -> None:
        self.audio_seconds.inc(transcript.duration)
        self.tokens.inc(len(transcript.token_ids))
        self.stage_seconds.labels("queue").observe(queued)
        for stage, seconds in transcript.timings.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class Work:
    """A request for the worker: a transcription (`audio` and its `options`) or, with
    `steps`, a stream's steps (Stream.feed_steps / finish_steps). `state` moves queued -> running
    or dropped under `lock`, so a client that leaves is either dropped unstarted or cancelled
    between steps, never both."""

    audio: object = None
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    on_token: Callable[[int], None] | None = None
    steps: Generator | None = None
    future: Future = field(default_factory=Future)
    state: str = "queued"
    gone: bool = False  # the client left (the worker drops its rows at the next step)
    submitted: float = field(default_factory=time.perf_counter)
    queued: float = 0.0  # seconds it waited for the worker
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> bool:
        with self.lock:
            if self.state == "dropped":
                return False
            self.state, self.queued = "running", time.perf_counter() - self.submitted
            return True

    def leave(self) -> bool:
        """The client left: True when it was still queued (dropped, nothing computed)."""
        with self.lock:
            self.gone = True
            if self.state == "queued":
                self.state = "dropped"
                return True
            return False


class Worker:
    """The one thread that drives the backend: a continuous batch of transcriptions and streams' steps."""

    def __init__(self, model: Transcriber, max_batch: int, metrics: Metrics):
        self.inbox: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self.model, self.max_batch, self.metrics = model, max_batch, metrics
        self.batcher = Batcher(model, max_batch)
        self.waiting: dict[int, Work] = {}  # id(job) -> the work it answers
        threading.Thread(target=self._loop, name="qasr-infer", daemon=True).start()

    def submit(self, work: Work) -> Work:
        self.inbox.put(work)
        return work

    def _loop(self) -> None:
        while True:
            self._take(block=self.batcher.idle)
            if not self.batcher.idle:
                self._step()

    def _take(self, block: bool) -> None:
        """Open queued work into free rows: transcriptions and streams' steps alike, in the order they came."""
        while self.batcher.fill():
            try:
                work = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if not work.start():
                continue  # its client left while it was queued
            gone = lambda w=work: w.gone  # noqa: E731
            if work.steps is not None:
                job = self.batcher.open_steps(work.steps, gone=gone)
            else:
                job = self.batcher.open(work.audio, work.options, on_token=work.on_token, gone=gone)
            self.waiting[id(job)] = work

    def _step(self) -> None:
        self.metrics.batch_size.observe(self.batcher.engine.active)
        try:
            finished = self.batcher.step()
        except Exception as exc:  # a bug, not bad input: fail this batch, keep serving
            log.exception("the batch failed")
            for work in self.waiting.values():
                work.future.set_exception(exc)
            self.waiting.clear()
            self.batcher.engine.clear()
            self.batcher = type(self.batcher)(self.model, self.max_batch)
            return
        for job in finished:
            work = self.waiting.pop(id(job))
            if work.gone:
                work.future.set_exception(Disconnected())
            elif isinstance(job.result, QasrError):
                work.future.set_exception(job.result)
            else:
                work.future.set_result(job.result)


class Service:
    """Loads the model in the background (so /health can say "loading"), then runs requests on it."""

    def __init__(self, options: Options):
        self.options = options
        self.model: Transcriber = None  # type: ignore[assignment]  # set once loaded (state "ready")
        self.aligner: Aligner | None = None
        self.worker: Worker = None  # type: ignore[assignment]  # started once loaded
        self.state = "loading"       # loading -> ready | failed; draining at shutdown
        self.error: str | None = None
        self.metrics = Metrics()
        self.admitted = 0
        self.realtime_sessions = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once it runs
        self.tasks: set = set()         # stream workers in flight (held so they are not collected)
        self.loaded_at = 0.0
        self.on_failure = lambda: None  # the runner stops the server when loading fails

    # -- loading -------------------------------------------------------------------------

    def start_loading(self) -> None:
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, name="qasr-load", daemon=True).start()

    def _load(self) -> None:
        o = self.options
        started = time.perf_counter()
        try:
            model = Transcriber.load(o.model, backend=o.backend, threads=o.threads, weights=o.weights,
                                     encoder_weights=o.encoder_weights, precision=o.precision)
            aligner = (Aligner.load(o.aligner, backend=o.backend, threads=o.threads, precision=o.precision)
                       if o.aligner else None)
            # One second of silence through every graph: lazily loaded sessions (the decoder loads
            # in the background) are in memory before /health says ready.
            silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
            model.transcribe(silence, sample_rate=SAMPLE_RATE, max_new_tokens=1)
            if aligner:
                aligner.align(silence, "a", "English", sample_rate=SAMPLE_RATE)
        except QasrError as exc:
            self.state, self.error = "failed", str(exc)
            log.error("qasr: error: %s", exc)
            self.on_failure()
            return
        self.model, self.aligner, self.loaded_at = model, aligner, time.time()
        self.worker = Worker(model, o.max_batch, self.metrics)
        self.state = "ready"
        log.info("loaded %s on %s in %.1f s", self.model_id, model.backend.name, time.perf_counter() - started)

    @property
    def model_id(self) -> str:
        """The id clients name: the --model string, or a local directory's name."""
        spec = self.options.model
        return Path(spec).name if os.path.isdir(spec) else spec

    # -- the queue -----------------------------------------------------------------------

    def admit(self) -> None:
        """Take a place (a batch row or the queue) or refuse at once; every admit() is paired with a leave()."""
        if self.state == "draining":
            raise Busy(503, "the server is shutting down", "shutting_down", retry_after=5)
        if self.state != "ready":
            message = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise Busy(503, message, "model_not_ready", retry_after=5)
        if self.admitted >= self.options.max_batch + self.options.max_queue:
            raise Busy(429, f"the server is busy: {self.admitted} requests are queued or running "
                            f"(--max-batch {self.options.max_batch}, --max-queue {self.options.max_queue}); "
                            "retry shortly", "queue_full")
        self.admitted += 1
        self.metrics.queue_depth.set(self.admitted)

    def leave(self) -> None:
        self.admitted -= 1
        self.metrics.queue_depth.set(self.admitted)

    def transcription(self, audio, options: TranscribeOptions,
                      on_token: Callable[[int], None] | None = None) -> Work:
        """Queue a recording for the batch; `wait` for its Transcript."""
        return self.worker.submit(Work(audio, options, on_token))

    async def stream(self, steps: Generator, gone=None):
        """Run a stream's steps (Stream.feed_steps / finish_steps) in the batch: their events."""
        return await self.wait(self.worker.submit(Work(steps=steps)), gone)

    async def wait(self, work: Work, gone=None):
        """The work's result; `gone()` (async) says the client left. A client that leaves while queued
        is dropped without its work ever starting; work already in the batch is cancelled at the
        next step. Either way: Disconnected."""
        answer = asyncio.wrap_future(work.future)
        try:
            while not (await asyncio.wait({answer}, timeout=0.2))[0]:
                if gone and not work.gone and await gone():
                    if work.leave():
                        self.metrics.dropped.inc()
                        raise Disconnected()
        except BaseException:
            work.leave()
            raise
        return answer.result()

    async def drain(self) -> None:
        """Refuse new work; uvicorn then waits for what is in flight (--drain-seconds)."""
        if self.state == "ready":
            self.state = "draining"
