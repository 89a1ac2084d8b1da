"""`WS /v1/realtime`: the transcription part of OpenAI's Realtime API over the streaming engine.

Client events: session.update, input_audio_buffer.append (base64 pcm16), .commit, .clear.
Server events: session.created, session.updated, input_audio_buffer.committed / .cleared /
.speech_started / .speech_stopped, conversation.item.input_audio_transcription.delta and
.completed, error. Each item (a turn) is one `Transcriber.stream()`; its steps join the
server's continuous batch, beside file requests and other sessions' steps.

OpenAI's deltas only ever append, while a streaming hypothesis may still revise its last words.
So a delta carries text once it is stable: the engine's committed text, or text that two
consecutive steps agree on; `completed` carries the final transcript. With `server_vad`, a turn
ends after `silence_duration_ms` of quiet following speech (frame energy, not a learned VAD).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from qasr.errors import QasrError, UsageError
from qasr.runtime.pauses import TurnDetector
from qasr.runtime.prompt import asr_prompt
from qasr.serve.auth import check_key, offered_key
from qasr.serve.openai_api import ApiError, language_name
from qasr.serve.service import Service

RATES = (16000, 24000)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class Config:
    """The session's audio.input settings, as session.update sets them."""

    rate: int = 24000
    language: str | None = None
    prompt: str = ""
    vad: dict | None = None

    def describe(self, model_id: str) -> dict:
        return {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": self.rate},
            "transcription": {"model": model_id, "language": self.language, "prompt": self.prompt},
            "turn_detection": self.vad}}}


class ClientError(Exception):
    """A client event that cannot be served: answered with an `error` event, the session goes on."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class Item:
    """One turn: its stream, the text already sent as deltas, and the previous step's text."""

    id: str
    stream: Any  # qasr.runtime.stream.Stream
    sent: str = ""
    previous: str = ""
    seconds: float = 0.0

    def delta(self, event) -> str:
        """New stable text of `event` past what was sent ("" while it revises text already sent).

        A step's text can end in U+FFFD, the bytes of a character whose last token has not come
        yet; two steps may agree on it, but the next step turns it into the whole character. Sent,
        it would make every later text disagree with what was sent, and the deltas would stop for
        the rest of the turn, so unfinished text stops before it."""
        stable = event.text if event.final else os.path.commonprefix([self.previous, event.text])
        if len(event.committed) > len(stable) and event.text.startswith(event.committed):
            stable = event.committed
        if not event.final:
            stable = stable.split("\ufffd", 1)[0]
        self.previous = event.text
        if len(stable) > len(self.sent) and stable.startswith(self.sent):
            delta, self.sent = stable[len(self.sent):], stable
            return delta
        return ""


class Session:
    def __init__(self, websocket: WebSocket, service: Service):
        self.ws, self.service = websocket, service
        self.config = Config()
        self.item: Item | None = None
        self.previous_item: str | None = None
        self.vad: TurnDetector | None = None

    async def send(self, event: dict) -> None:
        await self.ws.send_text(json.dumps({"event_id": _id("event"), **event}, ensure_ascii=False))

    async def error(self, exc: ClientError, event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": exc.code,
                                                    "message": str(exc), "param": exc.param, "event_id": event_id}})

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.config.describe(self.service.model_id)})
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            event_id = None
            try:
                if message.get("text") is None:
                    raise ClientError("binary messages are not events: send JSON text", "invalid_event")
                event = json.loads(message["text"])
                if not isinstance(event, dict):
                    raise ClientError("a client event is a JSON object with a type", "invalid_event")
                event_id = event.get("event_id")
                await self.handle(event)
            except json.JSONDecodeError:
                await self.error(ClientError("not JSON: each message is one client event", "invalid_json"))
            except ClientError as exc:
                await self.error(exc, event_id)

    async def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "session.update":
            self.update(event.get("session") or {})
            await self.send({"type": "session.updated", "session": self.config.describe(self.service.model_id)})
        elif kind == "input_audio_buffer.append":
            await self.append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            if self.item is None:
                raise ClientError("the audio buffer is empty: append audio before committing",
                                  "input_audio_buffer_commit_empty")
            await self.commit()
        elif kind == "input_audio_buffer.clear":
            self.item = None
            self.vad = None
            await self.send({"type": "input_audio_buffer.cleared"})
        else:
            raise ClientError(f"unsupported client event {kind!r} (this server transcribes: session.update, "
                              "input_audio_buffer.append, .commit, .clear)", "unknown_event", "type")

    def update(self, session: dict) -> None:
        """Apply session.update; settings take effect from the next turn."""
        if session.get("type", "transcription") != "transcription":
            raise ClientError("this server runs transcription sessions only (session.type 'transcription')",
                              "invalid_value", "session.type")
        audio = (session.get("audio") or {}).get("input") or {}
        fmt = audio.get("format") or {}
        if fmt:
            if fmt.get("type", "audio/pcm") != "audio/pcm":
                raise ClientError(f"unsupported audio format {fmt.get('type')!r}; use audio/pcm (16-bit mono)",
                                  "invalid_value", "session.audio.input.format.type")
            rate = int(fmt.get("rate") or 24000)
            if rate not in RATES:
                raise ClientError(f"unsupported rate {rate}; use 24000 or 16000", "invalid_value",
                                  "session.audio.input.format.rate")
            self.config.rate = rate
        transcription = audio.get("transcription") or {}
        if "language" in transcription:
            language = transcription.get("language")
            try:
                self.config.language = language_name(language, self.service.model.languages) if language else None
            except UsageError as exc:
                raise ClientError(str(exc), "invalid_value", "session.audio.input.transcription.language") from None
        if "prompt" in transcription:
            prompt = str(transcription.get("prompt") or "")
            try:
                asr_prompt(prompt, None)
            except UsageError as exc:
                raise ClientError(str(exc), "invalid_value", "session.audio.input.transcription.prompt") from None
            self.config.prompt = prompt
        if "turn_detection" in audio:
            vad = audio["turn_detection"]
            if vad is not None and vad.get("type") != "server_vad":
                raise ClientError(f"unsupported turn_detection {vad.get('type')!r}; use server_vad or null",
                                  "invalid_value", "session.audio.input.turn_detection.type")
            self.config.vad = vad
            self.vad = None

    async def append(self, audio) -> None:
        try:
            raw = base64.b64decode(audio or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ClientError("audio is not base64", "invalid_value", "audio") from None
        if len(raw) % 2:
            raise ClientError("audio is not whole 16-bit samples (odd byte count)", "invalid_value", "audio")
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        if self.config.vad is not None:
            await self.detect_turns(samples)
        else:
            await self.feed(samples)

    async def detect_turns(self, samples: np.ndarray) -> None:
        """server_vad: speech starts a turn, a long enough pause ends (commits) it."""
        if self.vad is None:
            vad = self.config.vad or {}
            self.vad = TurnDetector(self.config.rate, float(vad.get("threshold") or 0.5),
                                     int(vad.get("silence_duration_ms") or 500))
        for change in self.vad.push(samples):
            if change == "start":
                await self.send({"type": "input_audio_buffer.speech_started", "item_id": self.start_item().id,
                                 "audio_start_ms": self.vad.heard_ms})
            elif self.item is not None:
                await self.send({"type": "input_audio_buffer.speech_stopped", "item_id": self.item.id,
                                 "audio_end_ms": self.vad.heard_ms})
                await self.commit()
        if self.item is not None:
            await self.feed(samples)

    def start_item(self) -> Item:
        if self.item is None:
            model: Any = self.service.model
            self.item = Item(_id("item"), model.stream(language=self.config.language, context=self.config.prompt))
        return self.item

    async def feed(self, samples: np.ndarray) -> None:
        item = self.start_item()
        item.seconds += len(samples) / self.config.rate
        events = await self.step(item.stream.feed_steps(samples, sample_rate=self.config.rate))
        await self.deltas(item, events)

    async def step(self, steps):
        try:
            events = await self.service.stream(steps)
        except QasrError as exc:
            raise ClientError(str(exc), "invalid_value", "audio") from None
        return events

    async def deltas(self, item: Item, events) -> None:
        for event in events:
            delta = item.delta(event)
            if delta:
                await self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item.id,
                                 "content_index": 0, "delta": delta})

    async def commit(self) -> None:
        item, self.item = self.start_item(), None
        await self.send({"type": "input_audio_buffer.committed", "item_id": item.id,
                         "previous_item_id": self.previous_item})
        self.previous_item = item.id
        events = await self.step(item.stream.finish_steps())
        await self.deltas(item, events)
        await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id,
                         "content_index": 0, "transcript": events[-1].text,
                         "usage": {"type": "duration", "seconds": round(item.seconds, 3)}})


async def serve_session(websocket: WebSocket, service: Service) -> None:
    try:
        check_key(service.options.api_key, offered_key(websocket.headers, websocket.scope.get("subprotocols", [])))
    except ApiError:
        await websocket.close(code=1008, reason="missing or wrong API key")
        return
    protocol = "realtime" if "realtime" in websocket.scope.get("subprotocols", []) else None
    await websocket.accept(subprotocol=protocol)
    session = Session(websocket, service)
    if service.state != "ready" or service.realtime_sessions >= service.options.max_queue:
        busy = "the model is not loaded yet" if service.state != "ready" else "too many realtime sessions"
        await session.error(ClientError(f"{busy}; retry shortly", "server_busy"))
        await websocket.close(code=1013, reason=busy)
        return
    service.realtime_sessions += 1
    service.metrics.realtime_sessions.set(service.realtime_sessions)
    try:
        await session.run()
    except WebSocketDisconnect:
        pass
    finally:
        service.realtime_sessions -= 1
        service.metrics.realtime_sessions.set(service.realtime_sessions)

