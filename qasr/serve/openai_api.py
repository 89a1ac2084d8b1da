"""OpenAI's audio API over the runtime: `/v1/audio/transcriptions`, `/v1/models`, the error body.

Fields follow OpenAI's reference (and the `openai` SDK's types). What cannot be honoured is
refused with a 400 that says why: decoding is greedy, so a temperature other than 0 is an
error, not silently ignored; word times and subtitles need the forced aligner.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import soundfile as sf  # type: ignore[import-untyped]
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from qasr.errors import QasrError, UsageError
from qasr.runtime.audio import SAMPLE_RATE, load_audio
from qasr.runtime.formats import FORMATS, render, subtitle_segments
from qasr.runtime.options import TranscribeOptions
from qasr.runtime.prompt import asr_prompt, check_language, partial_text
from qasr.runtime.tokenizer import IncrementalDecoder
from qasr.serve.service import Busy, Disconnected, Service

# OpenAI's response formats: its two JSON shapes, and each of our formats it names ("text": txt).
PLAIN = {f.openai: f for f in FORMATS.values() if f.openai}
RESPONSE_FORMATS = ("json", *PLAIN, "verbose_json")
# ISO-639-1 codes (as OpenAI takes them) of the model languages; Cantonese and Filipino have
# none of their own, so their ISO-639-3 codes (and Tagalog's tl) are taken too.
ISO_639 = {
    "zh": "Chinese", "en": "English", "yue": "Cantonese", "ar": "Arabic", "de": "German", "fr": "French",
    "es": "Spanish", "pt": "Portuguese", "id": "Indonesian", "it": "Italian", "ko": "Korean", "ru": "Russian",
    "th": "Thai", "vi": "Vietnamese", "ja": "Japanese", "tr": "Turkish", "hi": "Hindi", "ms": "Malay",
    "nl": "Dutch", "sv": "Swedish", "da": "Danish", "fi": "Finnish", "pl": "Polish", "cs": "Czech",
    "fil": "Filipino", "tl": "Filipino", "fa": "Persian", "el": "Greek", "ro": "Romanian", "hu": "Hungarian",
    "mk": "Macedonian",
}


class ApiError(Exception):
    """An error a client gets as OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def busy(cls, exc: Busy) -> ApiError:
        kind = "rate_limit_error" if exc.status == 429 else "server_error"
        return cls(exc.status, str(exc), code=exc.code, kind=kind, headers={"Retry-After": str(exc.retry_after)})


@dataclass
class Job:
    """One transcription request, checked: everything the worker needs and nothing from the client's naming."""

    upload: UploadFile      # the spooled upload (a binary file; its client-side name is never used)
    language: str | None
    context: str
    response_format: str
    words: bool
    stream: bool

    @property
    def needs_aligner(self) -> bool:
        return self.words or (self.response_format in PLAIN and PLAIN[self.response_format].needs_words)


def language_name(value: str, supported: list[str]) -> str:
    """An ISO-639-1 code (OpenAI's convention) or a model language name -> the model's name."""
    code = value.strip().lower()
    return check_language(ISO_639.get(code, value), supported)


async def parse_form(request: Request, service: Service) -> Job:
    """The multipart form, checked field by field; a bad field is a 400 naming it."""
    form = await request.form(max_files=1, max_fields=32)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "no audio: send the recording as the multipart file field 'file'", "file")
    if upload.size == 0:
        raise ApiError(400, "the uploaded file is empty (0 bytes)", "file")
    response_format = str(form.get("response_format") or "json")
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"unsupported response_format {response_format!r}; choose one of "
                            f"{', '.join(RESPONSE_FORMATS)}", "response_format")
    temperature = form.get("temperature")
    if temperature not in (None, ""):
        try:
            value = float(str(temperature))
        except ValueError:
            raise ApiError(400, f"temperature {temperature!r} is not a number", "temperature") from None
        if value != 0:
            raise ApiError(400, f"temperature {value:g} is not supported: decoding is greedy (use 0)", "temperature")
    granularities = [str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")]
    unknown = set(granularities) - {"word", "segment"}
    if unknown:
        raise ApiError(400, f"unknown timestamp granularity {sorted(unknown)[0]!r}; use word or segment",
                       "timestamp_granularities")
    words = "word" in granularities
    stream = str(form.get("stream") or "false").lower() == "true"
    if words and not (response_format == "verbose_json" or stream):
        raise ApiError(400, "timestamp_granularities needs response_format verbose_json", "timestamp_granularities")
    if stream and response_format not in ("json", "text"):
        raise ApiError(400, f"stream=true sends text events; response_format {response_format} cannot stream",
                       "stream")
    parsed = Job(upload, None, str(form.get("prompt") or ""), response_format, words, stream)
    try:
        asr_prompt(parsed.context, None)  # a prompt the model cannot take is refused before any work
    except UsageError as exc:
        raise ApiError(400, str(exc), "prompt") from None
    if parsed.needs_aligner and service.aligner is None:
        what = "word timestamps" if words else f"{response_format} subtitles"
        raise ApiError(400, f"{what} need the forced aligner: start the server with --aligner BUNDLE",
                       "timestamp_granularities" if words else "response_format")
    language = str(form.get("language") or "").strip()
    if language:
        try:
            parsed.language = language_name(language, service.model.languages)
        except UsageError as exc:
            raise ApiError(400, str(exc), "language") from None
    return parsed


def read_upload(req: Job):
    """Off the worker (it only decodes): the upload as 16 kHz samples, its facts, the seconds it took."""
    started = time.perf_counter()
    wave = load_audio(req.upload.file)
    req.upload.file.seek(0)
    info = sf.info(req.upload.file)
    facts = {"sample_rate": info.samplerate, "channels": info.channels, "format": info.format}
    return wave, facts, time.perf_counter() - started


async def transcribe_upload(service: Service, req: Job, request: Request, on_token=None, stop=None):
    """Decode the upload, then the same Transcriber pieces as `qasr transcribe`, in the server's batch.

    Returns (transcript, facts, seconds queued); `stop` receives the queued Work (a stream cancels it)."""
    wave, facts, decoded = await asyncio.to_thread(read_upload, req)
    options = TranscribeOptions(language=req.language, context=req.context, sample_rate=SAMPLE_RATE,
                                max_new_tokens=service.options.max_new_tokens,
                                aligner=service.aligner if req.needs_aligner else None)
    work = service.transcription(wave, options, on_token)
    if stop:
        stop(work)
    result = await service.wait(work, request.is_disconnected)
    result.timings["audio"] += decoded
    result.timings["total"] += decoded
    result.timings["rtf"] = result.timings["total"] / result.duration
    return result, facts, work.queued


def verbose_json(result, facts: dict) -> dict:
    """OpenAI's verbose transcription: one segment per subtitle cue with word times, else one for the clip."""
    if result.words:
        cues = subtitle_segments(result.text, result.words)
        segments = [{"id": n, "seek": 0, "start": c.start, "end": c.end, "text": c.text, "tokens": [],
                     "temperature": 0.0} for n, c in enumerate(cues)]
    else:
        segments = [{"id": 0, "seek": 0, "start": 0.0, "end": result.duration, "text": result.text,
                     "tokens": list(result.token_ids), "temperature": 0.0}] if result.text else []
    out = {"task": "transcribe", "language": result.language, "duration": result.duration, "text": result.text,
           "segments": segments, "usage": {"type": "duration", "seconds": result.duration},
           "qasr": {"timings": result.timings, "truncated": result.truncated, "audio": facts}}
    if result.words is not None:
        out["words"] = [{"word": w.text, "start": w.start, "end": w.end} for w in result.words]
    return out


def extension(result, facts: dict) -> dict:
    """What the done event adds to OpenAI's fields (clients ignore it; the page shows it): the audio's
    facts, timings, and the transcript in every format `qasr transcribe` writes."""
    names = [f.name for f in FORMATS.values() if result.words is not None or not f.needs_words]
    return {"language": result.language, "duration": result.duration, "audio": facts, "timings": result.timings,
            "truncated": result.truncated, "files": {name: render(result, name) for name in names}}


def respond(req: Job, result, facts: dict) -> Response:
    fmt = req.response_format
    if fmt == "json":
        return JSONResponse({"text": result.text, "usage": {"type": "duration", "seconds": result.duration}})
    if fmt == "verbose_json":
        return JSONResponse(verbose_json(result, facts))
    return PlainTextResponse(render(result, PLAIN[fmt].name), media_type=PLAIN[fmt].media_type)


class TextDeltas:
    """Visible text from generated ids as they come. With a forced language all of it (the prompt
    holds the metadata); else what follows the model's `language X<asr_text>`, or, from the moment
    the output can no longer be that metadata, the whole output, as `parse_output` reads it then.
    The final event carries the parsed text, which is what `qasr transcribe` prints."""

    def __init__(self, tokenizer, forced: bool):
        self.decoder = IncrementalDecoder(tokenizer)
        self.raw = ""
        self.sent = 0
        self.plain = forced  # the whole output is text

    def push(self, token_id: int) -> str:
        self.raw += self.decoder.push(token_id)
        visible = partial_text(self.raw, self.plain)
        if visible is None:
            return ""
        self.plain = visible == self.raw.lstrip()  # read as plain text once, always: what was sent stays sent
        delta, self.sent = visible[self.sent:], len(visible)
        return delta


async def transcriptions(request: Request, service: Service) -> Response:
    try:
        service.admit()
    except Busy as exc:
        raise ApiError.busy(exc) from None
    admitted = True
    try:
        req = await parse_form(request, service)
        if req.stream:
            admitted = False  # the stream's generator leaves the queue when it ends
            return await stream_events(request, service, req)
        try:
            result, facts, queued = await transcribe_upload(service, req, request)
        except QasrError as exc:
            raise ApiError(400, str(exc).replace("<file>", "file"), "file") from None
        except Disconnected:
            raise ApiError(499, "the client closed the connection while its request was queued") from None
        service.metrics.record(result, queued)
        request.state.audio_seconds = result.duration
        return respond(req, result, facts)
    finally:
        if admitted:
            service.leave()


async def stream_events(request: Request, service: Service, req: Job) -> Response:
    """`stream=true`: server-sent events transcript.text.delta ... transcript.text.done.

    The worker pushes deltas through a thread-safe hand-off; a client that goes away marks its
    request gone, and the worker drops it from the batch at the next step.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    queued: list = []  # the Work once submitted, so a departed client can cancel it
    deltas = TextDeltas(service.model.tokenizer, forced=req.language is not None)

    def on_token(token_id: int) -> None:
        delta = deltas.push(token_id)
        if delta:
            loop.call_soon_threadsafe(events.put_nowait, ("delta", delta))

    async def work():
        try:
            result, facts, queued_for = await transcribe_upload(service, req, request, on_token, queued.append)
            service.metrics.record(result, queued_for)
            request.state.audio_seconds = result.duration
            await events.put(("done", (result, facts)))
        except QasrError as exc:
            await events.put(("error", ApiError(400, str(exc).replace("<file>", "file"), "file")))
        except Disconnected:
            await events.put(("gone", None))
        finally:
            service.leave()

    service.tasks.add(task := asyncio.create_task(work()))
    task.add_done_callback(service.tasks.discard)
    first = await events.get()
    if first[0] == "error":
        raise first[1]

    async def body():
        item = first
        try:
            while True:
                kind, value = item
                if kind == "delta":
                    yield _sse({"type": "transcript.text.delta", "delta": value})
                elif kind == "done":
                    result, facts = value
                    yield _sse({"type": "transcript.text.done", "text": result.text,
                                "usage": {"type": "duration", "seconds": result.duration},
                                "qasr": extension(result, facts)})
                    return
                else:
                    error = value if kind == "error" else ApiError(499, "the client went away")
                    yield _sse({"type": "error", **error.body()})
                    return
                item = await events.get()
        finally:
            for left in queued:
                left.leave()  # the worker drops it at its next step; work() then leaves the queue

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def models(service: Service) -> dict:
    return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": int(service.loaded_at),
                                        "owned_by": "qasr"}]}
