"""What transcription and alignment return, whatever the backend: every writer and endpoint takes these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Word:
    """One aligned unit (a word, or one CJK character); times in seconds."""

    text: str
    start: float
    end: float


@dataclass
class Transcript:
    """What one clip's transcription returns, whatever the backend; every writer takes this."""

    text: str
    language: str                  # merged language string, "" when unknown or silence
    token_ids: list[int]           # generated ids, end-of-sequence excluded
    audio: str | None = None       # the source (path) when there is one
    duration: float = 0.0          # seconds of audio
    words: list[Word] | None = None
    # seconds per stage: audio (read, resample), frontend, encoder, setup (KV cache; on the first
    # call also the wait for a decoder still loading), prefill, decode, align; total; rtf
    timings: dict[str, float] = field(default_factory=dict)
    truncated: bool = False        # a token budget cut the text; reported, never hidden


@dataclass(frozen=True)
class Segment:
    """One subtitle cue; times in seconds (whole milliseconds)."""

    start: float
    end: float
    text: str
