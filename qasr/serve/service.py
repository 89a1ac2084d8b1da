"""The one model in memory, the bounded queue in front of it, and the server's metrics.

Inference runs on one worker thread: a backend holds one KV cache and ONNX Runtime (or TensorRT)
already uses every core it is given for one request, so a second worker would only split them.
Requests wait for that worker in a queue bounded by --max-queue; past it they are refused at
once (429) rather than piling up memory, and a client that leaves while queued is dropped
before any work is spent on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qasr.errors import QasrError
from qasr.runtime.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from qasr.runtime.align import Aligner
    from qasr.runtime.transcribe import Transcriber

log = logging.getLogger("qasr.serve")
WORKERS = 1
STAGES = ("queue", "audio", "frontend", "encoder", "setup", "prefill", "decode", "align", "total")


@dataclass
class Options:
    """What `qasr serve` was started with (the CLI flags, one for one)."""

    model: str
    aligner: str | None = None
    backend: str = "auto"
    threads: int | None = None
    api_key: str | None = None
    max_upload_mb: float = 100.0
    max_queue: int = 16
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
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def record(self, transcript, queued: float) -> None:
        self.audio_seconds.inc(transcript.duration)
        self.tokens.inc(len(transcript.token_ids))
        self.stage_seconds.labels("queue").observe(queued)
        for stage, seconds in transcript.timings.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Service:
    """Loads the model in the background (so /health can say "loading"), then runs requests on it."""

    def __init__(self, options: Options):
        self.options = options
        self.model: Transcriber = None  # type: ignore[assignment]  # set once loaded (state "ready")
        self.aligner: Aligner | None = None
        self.state = "loading"       # loading -> ready | failed; draining at shutdown
        self.error: str | None = None
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="qasr-infer")
        self.admitted = 0
        self.realtime_sessions = 0
        self.slots: asyncio.Semaphore | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once it runs
        self.tasks: set = set()         # stream workers in flight (held so they are not collected)
        self.loaded_at = 0.0
        self.on_failure = lambda: None  # the runner stops the server when loading fails

    # -- loading -------------------------------------------------------------------------

    def start_loading(self) -> None:
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, name="qasr-load", daemon=True).start()

    def _load(self) -> None:
        from qasr.runtime.align import Aligner
        from qasr.runtime.transcribe import Transcriber

        o = self.options
        started = time.perf_counter()
        try:
            model = Transcriber.load(o.model, backend=o.backend, threads=o.threads)
            aligner = Aligner.load(o.aligner, backend=o.backend, threads=o.threads) if o.aligner else None
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
        self.model, self.aligner, self.loaded_at, self.state = model, aligner, time.time(), "ready"
        log.info("loaded %s on %s in %.1f s", self.model_id, model.backend.name, time.perf_counter() - started)

    @property
    def model_id(self) -> str:
        """The id clients name: the --model string, or a local directory's name."""
        spec = self.options.model
        return Path(spec).name if os.path.isdir(spec) else spec

    # -- the queue -----------------------------------------------------------------------

    def admit(self) -> None:
        """Take a place in the queue or refuse at once; every admit() is paired with a leave()."""
        if self.state == "draining":
            raise Busy(503, "the server is shutting down", "shutting_down", retry_after=5)
        if self.state != "ready":
            message = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise Busy(503, message, "model_not_ready", retry_after=5)
        if self.admitted >= WORKERS + self.options.max_queue:
            raise Busy(429, f"the server is busy: {self.admitted} requests are queued or running "
                            f"(--max-queue {self.options.max_queue}); retry shortly", "queue_full")
        self.admitted += 1
        self.metrics.queue_depth.set(self.admitted)

    def leave(self) -> None:
        self.admitted -= 1
        self.metrics.queue_depth.set(self.admitted)

    async def run(self, work, gone=None):
        """Run `work()` on the worker once a slot frees; `gone()` (async) says the client left.

        Returns (result, seconds spent waiting). A client that leaves while waiting is dropped
        without its work ever starting; once started, work runs to its end (a caller that can
        stop it early passes a callable that checks a flag).
        """
        if self.slots is None:
            self.slots = asyncio.Semaphore(WORKERS)
        queued = time.perf_counter()
        acquire = asyncio.ensure_future(self.slots.acquire())
        try:
            while not (await asyncio.wait({acquire}, timeout=0.2))[0]:
                if gone and await gone():
                    self.metrics.dropped.inc()
                    raise Disconnected()
        except BaseException:
            if not acquire.cancel() and not acquire.cancelled():
                self.slots.release()  # it was granted just as we gave up
            raise
        waited = time.perf_counter() - queued
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work), waited
        finally:
            self.slots.release()

    async def drain(self) -> None:
        """Refuse new work; uvicorn then waits for what is in flight (--drain-seconds)."""
        if self.state == "ready":
            self.state = "draining"
