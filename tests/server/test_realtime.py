"""`WS /v1/realtime` through the official `openai` SDK (`client.realtime.connect`), on the real
streaming engine: the completed transcript is what `Transcriber.stream()` gives for the same audio."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import pytest

import openai  # the official SDK, a test dependency: the real client

from qasr.runtime.transcribe import Transcriber
from support import served


@pytest.fixture(scope="module")
def server(bundle):
    with served(bundle("tiny-untied"), api_key="rt-key") as running:
        yield running


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def session(server, **input_options):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="rt-key", max_retries=0)
    connection = client.realtime.connect(model="qasr")
    conn = connection.__enter__()
    assert conn.recv().type == "session.created"
    conn.session.update(session={"type": "transcription", "audio": {"input": input_options}})
    updated = conn.recv()
    assert updated.type == "session.updated", updated
    return connection, conn


def send_audio(conn, samples: np.ndarray, rate: int, block_seconds: float = 0.1) -> None:
    step = int(rate * block_seconds)
    for start in range(0, len(samples), step):
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm16(samples[start:start + step])).decode())


def events_until(conn, kind: str, count: int = 1) -> list:
    events = []
    while sum(e.type == kind for e in events) < count:
        events.append(conn.recv())
        assert events[-1].type != "error", events[-1]
    return events


def test_deltas_then_the_streaming_engines_transcript(server, bundle, speech):
    audio = speech(9)
    wave = np.frombuffer(pcm16(audio), dtype="<i2").astype(np.float32) / 32768.0  # what the server hears
    stream = Transcriber.load(bundle("tiny-untied"), backend="onnxruntime").stream(language="English")
    stream.feed(wave)
    expected = stream.finish()[-1].text
    connection, conn = session(server, format={"type": "audio/pcm", "rate": 16000},
                               transcription={"model": "qasr", "language": "en"}, turn_detection=None)
    with connection:
        send_audio(conn, audio, 16000)
        conn.input_audio_buffer.commit()
        events = events_until(conn, "conversation.item.input_audio_transcription.completed")
    kinds = [e.type for e in events]
    committed = kinds.index("input_audio_buffer.committed")
    deltas = [e.delta for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    completed = events[-1]
    assert completed.transcript == expected and expected
    assert deltas and expected.startswith("".join(deltas))
    assert any(k.endswith(".delta") for k in kinds[:committed])  # text arrived while the audio was still coming
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {completed.item_id}
    assert completed.usage.seconds == pytest.approx(9, abs=0.01)


def test_24_khz_and_server_vad_cut_turns_at_pauses(server, speech):
    rate = 24000
    import soxr

    turn = soxr.resample(speech(3), 16000, rate)
    quiet = np.zeros(int(1.5 * rate), dtype=np.float32)
    connection, conn = session(server, format={"type": "audio/pcm", "rate": rate},
                               transcription={"model": "qasr"},
                               turn_detection={"type": "server_vad", "silence_duration_ms": 800})
    with connection:
        send_audio(conn, np.concatenate([turn, quiet, turn, quiet]), rate)
        events = events_until(conn, "conversation.item.input_audio_transcription.completed", 2)
    started = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    completed = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert len(started) >= 2 and len(stopped) >= 2
    assert started[0].audio_start_ms < stopped[0].audio_end_ms < started[1].audio_start_ms
    assert completed[0].item_id != completed[1].item_id


def test_bad_events_get_error_events_and_the_session_goes_on(server):
    connection, conn = session(server, format={"type": "audio/pcm", "rate": 16000})
    with connection:
        conn.input_audio_buffer.commit()
        error = conn.recv()
        assert error.type == "error" and error.error.code == "input_audio_buffer_commit_empty"
        conn.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
        error = conn.recv()
        assert error.type == "error" and error.error.param == "audio"
        conn.send({"type": "response.create"})
        assert conn.recv().error.code == "unknown_event"
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 44100}}}})
        assert "44100" in conn.recv().error.message
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"language": "xx-klingon", "prompt": "<|audio_pad|>"}}}})
        assert conn.recv().error.param == "session.audio.input.transcription.language"
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"prompt": "<|audio_pad|>"}}}})
        assert conn.recv().error.param == "session.audio.input.transcription.prompt"
        conn.input_audio_buffer.append(audio=base64.b64encode(pcm16(np.zeros(1600, np.float32))).decode())
        conn.input_audio_buffer.clear()
        assert conn.recv().type == "input_audio_buffer.cleared"


def test_a_wrong_key_is_refused(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(Exception) as caught:
        with client.realtime.connect(model="qasr") as conn:
            conn.recv()
    assert "403" in str(caught.value)


@dataclass
class Step:
    """The fields of a StreamEvent the transport reads."""

    text: str
    committed: str
    final: bool


class ScriptedStream:
    """A stand-in for the streaming engine, for the transport alone: each 0.5 s of audio adds a word
    (the previous one revised once), so the session must send only stable text as deltas."""

    words = ["one", "two", "three", "four", "five", "six"]

    def __init__(self):
        self.samples, self.steps = 0, 0

    def feed_steps(self, samples, sample_rate=16000):
        """As Stream.feed_steps, with no decoder requests: the events are its return value."""
        self.samples += len(samples)
        events = []
        while self.samples >= (self.steps + 1) * sample_rate // 2:
            self.steps += 1
            shown = self.words[: self.steps]
            events.append(Step(" ".join(shown[:-1] + [shown[-1].upper()]), "", False))
        return events
        yield

    def finish_steps(self):
        return [Step(" ".join(self.words[: self.steps]), " ".join(self.words[: self.steps]), True)]
        yield


def test_the_transport_sends_stable_text_then_the_final_one(server, monkeypatch):
    monkeypatch.setattr(Transcriber, "stream", lambda self, **options: ScriptedStream())
    connection, conn = session(server, format={"type": "audio/pcm", "rate": 16000}, turn_detection=None)
    with connection:
        send_audio(conn, np.zeros(3 * 16000, np.float32), 16000)
        conn.input_audio_buffer.commit()
        events = events_until(conn, "conversation.item.input_audio_transcription.completed")
    deltas = [e.delta for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    assert events[-1].transcript == "one two three four five six"
    assert "".join(deltas) == events[-1].transcript and len(deltas) > 2
    assert not any(d.isupper() for d in deltas)  # the revised (upper-case) last word is never sent


def test_a_character_still_being_decoded_is_not_sent():
    from qasr.serve.realtime import Item

    item = Item("item", stream=None)
    texts = ["treinta \ufffd", "treinta \ufffd", "treinta 공", "treinta 공개", "treinta 공개합"]
    deltas = [item.delta(Step(t, "", False)) for t in texts]
    assert deltas == ["", "treinta ", "", "공", "개"]
