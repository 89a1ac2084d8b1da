"""The FastAPI application: routes, the key check, the upload limit, one log line per request.

Every error a client can get is OpenAI's error body; an unexpected exception is logged here with
its traceback and answered with a one-line 500, never the traceback itself.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from qasr.memory import status_kb
from qasr.serve import openai_api
from qasr.serve.auth import check_key, offered_key
from qasr.serve.openai_api import ApiError
from qasr.serve.realtime import serve_session
from qasr.serve.service import Service

log = logging.getLogger("qasr.serve")
STATIC = files("qasr.serve") / "static"
ROUTES = ("/v1/audio/transcriptions", "/v1/models", "/v1/realtime", "/health", "/metrics", "/info", "/")


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="qasr", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan(service))
    app.state.service = service
    _errors(app)
    _routes(app, service)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    if service.options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=service.options.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(UploadLimit, limit=int(service.options.max_upload_mb * 1024 * 1024))
    app.add_middleware(AccessLog, service=service)
    return app


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(app):
        if service.state == "loading":
            service.start_loading()
        yield
        await service.drain()

    return lifespan


def _routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        check_key(service.options.api_key, offered_key(request.headers))
        return await openai_api.transcriptions(request, service)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(service.options.api_key, offered_key(request.headers))
        return openai_api.models(service)

    @app.get("/health")
    async def health():
        body = {"status": service.state, "model": service.model_id, "key_required": bool(service.options.api_key)}
        if service.error:
            body["error"] = service.error
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(service.options.api_key, offered_key(request.headers))
        data, media = service.metrics.render()
        return Response(data, media_type=media)

    @app.get("/info")
    async def info(request: Request):
        check_key(service.options.api_key, offered_key(request.headers))
        return describe(service)

    @app.get("/")
    async def page():
        return FileResponse(str(STATIC / "index.html"))

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        await serve_session(websocket, service)


def describe(service: Service) -> dict:
    """What the page's side panel shows: model, languages, backend, device, threads, memory."""
    model = service.model
    return {
        "model": service.model_id, "state": service.state, "languages": model.languages if model else [],
        "aligner": service.options.aligner if service.aligner else None, "backend": model.backend.name if model else None,
        "device": model.backend.device_label if model else None,
        "threads": service.options.threads or os.cpu_count(),
        "memory_mb": _resident_mb(), "max_upload_mb": service.options.max_upload_mb,
        "max_queue": service.options.max_queue, "key_required": bool(service.options.api_key),
    }


def _resident_mb() -> float | None:
    """This process's resident memory (VmRSS), where /proc has it."""
    kb = status_kb("VmRSS")
    return None if kb is None else round(kb / 1024, 1)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind=kind).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return ApiError(400, str(first.get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal server error (logged on the server)", kind="server_error").response()


class UploadLimit:
    """413 for a body over --max-upload-mb, decided from Content-Length before reading, else counted
    as the bytes arrive; the body is never buffered whole first."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        mb = self.limit / (1024 * 1024)
        error = ApiError(413, f"the upload is larger than the server's {mb:g} MB limit (--max-upload-mb)",
                         "file", "file_too_large")
        await error.response()({"type": "http"}, _no_body, send)


class _TooLarge(Exception):
    pass


async def _no_body() -> dict:
    return {"type": "http.disconnect"}


class AccessLog:
    """One log line per request (method, path, status, seconds, audio seconds) and the request counter."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [101 if scope["type"] == "websocket" else 500]
        scope.setdefault("state", {})

        async def watched(message):
            if message["type"] in ("http.response.start", "websocket.close"):
                status[0] = message.get("status", message.get("code", status[0]))
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = scope["path"]
            route = path if path in ROUTES else "/static" if path.startswith("/static/") else "other"
            self.service.metrics.requests.labels(route, str(status[0])).inc()
            audio = scope["state"].get("audio_seconds")
            log.info("%s %s %s %.3fs%s", scope.get("method", "WS"), path, status[0], time.perf_counter() - started,
                     f" audio={audio:.2f}s" if audio is not None else "")
