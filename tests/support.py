"""Helpers the tests share: numeric parity checks, a real server on a loopback port, the CLI's text.

The GPU tests import this module on a machine that has neither the official package nor the
server extra, so only numpy and qasr's runtime are imported at the top: nothing here imports the
oracle or torch, and the server's parts are imported where a server is started."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import threading
import time

from pathlib import Path

import numpy as np

from qasr.cli import main as qasr_main
from qasr.kernels.fbank import log_mel
from qasr.runtime.backends.onnxruntime_cpu import PER_SESSION, OnnxRuntimeBackend
from qasr.runtime.batch import greedy_decode
from qasr.runtime.windows import join_windows, split_windows

DATA = Path(__file__).parent / "data"  # the test recordings
EOS = (151645, 151643)
AUDIO = 151676
PROMPT_HEAD = [151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669]
PROMPT_TAIL = [151670, 151645, 198, 151644, 77091, 198]


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the parity measure of the tiers (README, Parity). Takes numpy arrays
    or torch tensors (as arrays)."""
    actual, expected = _array(actual), _array(expected)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _array(x) -> np.ndarray:
    return np.asarray(x.detach().float() if hasattr(x, "detach") else x, dtype=np.float32)


def check_parity(candidate, reference: OnnxRuntimeBackend, speech, free_running: bool, tolerance: float) -> None:
    """Engine (or ORT on CUDA) against the fp32 graphs on the CPU, on real speech."""
    windows, frames, conv = split_windows(log_mel(speech(7.0)), 800)
    hidden = reference.encode(windows, frames, conv)
    assert relative_error(join_windows(candidate.encode(windows, frames, conv), frames),
                          join_windows(hidden, frames)) < tolerance
    embeds = reference.project(join_windows(hidden, frames))
    assert relative_error(candidate.project(join_windows(hidden, frames)), embeds) < tolerance
    prompt = PROMPT_HEAD + [AUDIO] * len(embeds) + PROMPT_TAIL
    expected = greedy_decode(reference, prompt, embeds, AUDIO, 24, (), keep_logits=True)
    logits = greedy_decode(candidate, prompt, embeds, AUDIO, 24, (), keep_logits=True,
                           forced=expected.tokens).logits  # teacher-forced along the reference's ids
    cosines = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(logits, expected.logits)]
    agree = np.mean([int(a.argmax()) == int(b.argmax()) for a, b in zip(logits, expected.logits)])
    assert min(cosines) >= 0.99 and agree >= 0.99, (min(cosines), agree)
    if free_running:
        got = greedy_decode(candidate, prompt, embeds, AUDIO, 24, EOS, prefill_chunk=64)
        assert got.tokens == greedy_decode(reference, prompt, embeds, AUDIO, 24, EOS, prefill_chunk=64).tokens


def check_batch(candidate, reference: OnnxRuntimeBackend, speech) -> None:
    """Five requests of different lengths, at most three per step (rows join and leave; TensorRT runs
    the buckets of 1, 2 and 4 rows), against each request alone on the fp32 graphs on the CPU."""
    from qasr.runtime.batch import BatchDecoder
    from qasr.runtime.decode import Sequence

    def sequences(backend) -> list[Sequence]:
        made = []
        for i, seconds in enumerate((7.0, 2.5, 11.0, 4.0, 1.2)):
            windows, frames, conv = split_windows(log_mel(speech(seconds, start=i)), 800)
            embeds = backend.project(join_windows(backend.encode(windows, frames, conv), frames))
            made.append(Sequence(PROMPT_HEAD + [AUDIO] * len(embeds) + PROMPT_TAIL, embeds, AUDIO, 8 + 4 * i, EOS))
        return made

    engine = BatchDecoder(candidate, max_batch=3, prefill_chunk=64)
    batched = sequences(reference)
    for sequence in batched:
        engine.add(sequence)
    engine.run()
    expected = [greedy_decode(reference, s.prompt, s.audio_embeds, AUDIO, s.budget, EOS, prefill_chunk=64).tokens
                for s in sequences(reference)]
    assert [s.result.tokens for s in batched] == expected


# -- a server on a loopback port ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`qasr serve` with these options until stop(); url is its base address. `ready=False` returns
    as soon as the server is started, before its model has loaded."""

    def __init__(self, options, ready: bool = True):
        import uvicorn

        from qasr.serve.app import create_app
        from qasr.serve.service import Service

        self.service = Service(options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.service), host="127.0.0.1", port=self.port, access_log=False,
                                log_level="warning", timeout_graceful_shutdown=options.drain_seconds)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        if ready:
            self.wait_ready()

    def wait_ready(self, seconds: float = 120) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.service.state == "failed":
                raise RuntimeError(self.service.error)
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {seconds} s (state {self.service.state})")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Blocker:
    """Holds the one inference worker (and a place in the queue) until released, as a long request
    would: work for the batch (as a stream's steps are) that waits for the release when it starts."""

    def __init__(self, server):
        self.release, holding = threading.Event(), threading.Event()
        service = server.service

        def held():
            holding.set()
            self.release.wait()
            return []
            yield  # a generator: the worker starts it as it starts a stream's steps

        async def request():
            service.admit()
            try:
                await service.stream(held())
            finally:
                service.leave()

        self.future = asyncio.run_coroutine_threadsafe(request(), service.loop)
        holding.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.future.result(10)


def realtime_transcript(url: str, pcm, opened=lambda: None, **input_options) -> str:
    """One `WS /v1/realtime` session through the openai SDK: 16 kHz int16 `pcm` sent, committed, and
    the completed transcript returned; `opened()` runs as soon as the session exists."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with client.realtime.connect(model="qasr") as conn:
        assert conn.recv().type == "session.created"
        opened()
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None, **input_options}}})
        assert conn.recv().type == "session.updated"
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm.tobytes()).decode())
        conn.input_audio_buffer.commit()
        while (event := conn.recv()).type != "conversation.item.input_audio_transcription.completed":
            assert event.type != "error", event
        return event.transcript


def cli_text(*argv) -> str:
    """What `qasr ARGV...` writes to stdout (it must succeed): the text the server must match."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert qasr_main([str(a) for a in argv]) == 0
    return out.getvalue()


@contextlib.contextmanager
def served(model, **options):
    """`qasr serve` with bundle `model` on the CPU, with these Options, for the length of the block."""
    from qasr.serve.service import Options

    running = RunningServer(Options(model=str(model), **{"backend": "onnxruntime", **options}))
    try:
        yield running
    finally:
        running.stop()


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a qasr process as a user starts one: this process's, without the pool per
    session that the test process keeps for its own sessions (conftest), so that the child runs its
    graphs in one thread pool as `qasr` does; plus `extra`."""
    return {key: value for key, value in os.environ.items() if key != PER_SESSION} | extra


def spawn(argv: list, **popen) -> subprocess.Popen:
    """A child process whose SIGINT and SIGTERM act as from a terminal, however the test run was
    started: a run in the background (`nohup pytest &`) ignores SIGINT, an ignored or blocked signal
    passes to the children it starts, and a test that interrupts a child would then wait forever
    for an exit that never comes."""
    def default_signals() -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])

    return subprocess.Popen([str(a) for a in argv], preexec_fn=default_signals, **popen)
