"""`qasr serve`: an OpenAI-compatible HTTP/WebSocket server and a web page, over the same pipeline.

The server adds transport, queueing and limits; decoding, parsing and formatting stay in
`qasr.runtime` (Transcriber, Aligner, formats.render), so it gives the CLI's text.
FastAPI and uvicorn are an extra (`pip install "qwen3-asr-edge[serve]"`), imported only here.
"""

from __future__ import annotations

from qasr.errors import UsageError


def require_extra() -> None:
    """One line naming the extra when the server's packages are missing."""
    try:
        import fastapi  # noqa: F401
        import multipart  # type: ignore[import-untyped]  # noqa: F401  (python-multipart, for uploads)
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"qasr serve needs {exc.name}: pip install \"qwen3-asr-edge[serve]\"") from None


def require_ray() -> None:
    """One line naming the extra when `qasr serve --ray` lacks Ray Serve."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"qasr serve --ray needs {exc.name}: pip install \"qwen3-asr-edge[ray]\"") from None
