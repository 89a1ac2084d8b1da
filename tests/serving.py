"""A real uvicorn server on a free loopback port, for the server tests (in this process, one thread)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time

import httpx2 as httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`qasr serve` with these options until stop(); url is its base address."""

    def __init__(self, options):
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
        self.wait_ready()

    def wait_ready(self, seconds: float = 120) -> None:
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
    import base64

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
    from qasr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in argv]) == 0
    return out.getvalue()
