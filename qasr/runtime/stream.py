"""Streaming recognition: live audio in, the transcript so far out after every chunk.

The policy is the official one (qwen-asr 0.0.6 `streaming_transcribe`; docs/streaming.md), step for step:
every `chunk_seconds` of audio the model re-reads all the audio so far, with the prompt
`prompt_raw + prefix`, where the prefix is the previous raw output re-tokenised minus its last
`unfixed_tokens` ids (none for the first `unfixed_chunks` chunks; backed off past a broken UTF-8
character; at the flush at least one id kept), then greedy generation and the official parse.

What each step costs is bounded instead of growing with the stream:
- Features: each frame's log10 mel power is computed once (LogMelStream, unclamped); a step
  recomputes only the last frame, whose window the reference reflect-pads at the current end,
  and applies the clamp floor of all the audio so far, as log_mel of the whole prefix would.
- Encoder: an 8 s window is encoded once, when all of its frames are final, and kept while the
  clamp floor leaves its bins alone (a louder frame later raises the floor under the quiet bins
  of windows already cached: those windows are encoded again). Only the open window is encoded
  every step.
- Decoder: the batch engine keeps the stream's KV rows between steps, and a step reuses those of
  the prompt up to the first audio row that changed (a Sequence's `keep`); the rest of the prompt
  is prefilled again. A step is one request to the engine, so in the server the steps of many
  streams, and of file requests, share each decode step (`feed_steps`).
- Segments: an endless stream is cut into segments at the first pause once a segment is longer
  than `segment_seconds` (or at twice that, pause or not). A closed segment's text is committed,
  and the next segment starts afresh with the committed text's tail as its context, so memory
  and per-step compute stay flat. `segment_seconds=0` keeps one segment: the official policy.
- Clamp floor across segments: a segment clamps at the loudest bin of the whole stream so far,
  as the official stream (one segment) does every step, not at its own. A segment starting
  afresh would see its own peak rise many times, each rise re-encoding its cached windows and
  re-prefilling its whole prompt (the slowest steps of a stream); the stream's running peak
  stops rising soon (a new record is ever rarer), so later segments keep their windows.

Pauses are found by frame energy, not a learned VAD: the cut only bounds cost (a cut inside a
word costs that word, not the stream), and energy on 10 ms frames needs no model, no dependency
and no extra compute beside the encoder's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import soxr

from qasr.errors import AudioError, UsageError
from qasr.kernels.fbank import HOP_LENGTH, N_FFT, LogMelStream, clamp_and_scale, log10_mel_batch
from qasr.runtime.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE
from qasr.runtime.batch import run_steps
from qasr.runtime.decode import Sequence
from qasr.runtime.embed import add_time, embed_audio, embed_features
from qasr.runtime.pauses import first_pause, frame_energy_db
from qasr.runtime.prompt import AUDIO_PAD, asr_prompt, check_language, expand_audio, merge_languages, parse_output
from qasr.runtime.windows import token_count

MAX_NEW_TOKENS = 32  # the official streaming examples' budget per step
SEGMENT_SECONDS = 30.0
CONTEXT_CHARS = 200  # committed text carried into the next segment's context
PAUSE_SECONDS = 0.3  # quiet this long counts as a pause
_PAD = N_FFT // 2


@dataclass
class StreamEvent:
    chunk: int              # steps run so far (this one included)
    audio_seconds: float    # stream audio the text accounts for (up to a segment's cut, or the last step's end)
    language: str           # as the official state.language (languages of closed segments merged)
    text: str               # the whole transcript so far, as the official state.text
    committed: str          # the prefix of `text` that can no longer change
    final: bool             # the event of finish()
    compute_seconds: float  # time spent on this step


def rollback_prefix(tokenizer, raw: str, unfixed_tokens: int, final: bool) -> str:
    """The official prefix: `raw` re-tokenised, its last `unfixed_tokens` ids dropped.

    During the stream a prefix ending in a broken UTF-8 character drops more ids until it is
    whole (or empty); at the flush at least one id is kept and no check is made.
    """
    ids = tokenizer.encode(raw)
    if final:
        return tokenizer.decode(ids[: max(1, len(ids) - unfixed_tokens)], skip_special_tokens=False)
    drop = unfixed_tokens
    while True:
        end = max(0, len(ids) - drop)
        prefix = tokenizer.decode(ids[:end], skip_special_tokens=False) if end else ""
        if "\ufffd" not in prefix or end == 0:
            return prefix
        drop += 1


class SegmentAudio:
    """The audio of one segment and its audio embeddings, computed incrementally.

    `embeddings(n)` equals embed_audio(samples[:n], peak=peak_before): the same features exactly,
    each completed window's embeddings from the step that first saw it complete (while the clamp
    floor leaves it alone), the open window encoded again. It also says the first embedding row
    that differs from the previous call's, which the decoder keeps its cache up to.
    """

    def __init__(self, backend, window_frames: int, peak_before: float = -np.inf):
        self.backend = backend
        self.window_frames = window_frames
        self.peak_before = peak_before  # the loudest log10 mel bin of the stream before this segment
        self.samples = np.empty(0, dtype=np.float32)
        self.mel = LogMelStream(clamp=False)
        self.raw = np.empty((128, 0), dtype=np.float32)  # log10 mel power of the frames whose window has arrived
        self.frame_peak = np.empty(0, dtype=np.float32)  # per frame, the max over its bins
        self.windows: list[tuple[np.ndarray, np.float32, np.float32]] = []  # (embeddings, floor, min bin)

    def append(self, samples: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, samples])
        frames = self.mel.push(samples)
        self.raw = np.concatenate([self.raw, frames], axis=1)
        self.frame_peak = np.concatenate([self.frame_peak, frames.max(axis=0, initial=-np.inf)])

    def features(self, n: int) -> tuple[np.ndarray, int]:
        """(log10 mel power [128, n // 160] of samples[:n] as log_mel computes it, frames whose
        window lies inside samples[:n]). Only frames past that are computed here, from the tail."""
        total = n // HOP_LENGTH
        settled = min(self.raw.shape[1], max(0, (n - _PAD) // HOP_LENGTH + 1), total)
        if settled == total:
            return self.raw[:, :total], settled
        start = max(0, settled - 2)  # two frames of margin: the tail's own head padding stays out
        tail = log10_mel_batch([self.samples[start * HOP_LENGTH : n]])[0][:, settled - start :]
        return np.concatenate([self.raw[:, :settled], tail], axis=1), settled

    def embeddings(self, n: int, timings: dict) -> tuple[np.ndarray, int]:
        """(audio embeddings [N, hidden] of samples[:n], first row that changed since the last call)."""
        start = time.perf_counter()
        raw, settled = self.features(n)
        if raw.shape[1] == 0:
            raise AudioError(f"<stream>: too short ({n} samples; at least 160, 10 ms, are needed)")
        peak = self._peak(raw, settled)
        floor = np.float32(peak - 8.0)
        add_time(timings, "frontend", time.perf_counter() - start)
        size = self.window_frames
        complete = settled // size
        del self.windows[complete:]  # a shorter view (a segment cut) or the open window: not complete here
        changed = len(self.windows)
        for w in range(complete):
            if w < len(self.windows) and self._still_valid(self.windows[w], floor):
                continue
            changed = min(changed, w)
            part = raw[:, w * size : (w + 1) * size]
            embeds = embed_features(self.backend, clamp_and_scale(part.copy(), peak), size, timings, later=w > 0)
            entry = (embeds, floor, part.min())
            if w < len(self.windows):
                self.windows[w] = entry
            else:
                self.windows.append(entry)
        parts = [embeds for embeds, _, _ in self.windows]
        if raw.shape[1] > complete * size:
            open_part = clamp_and_scale(raw[:, complete * size :].copy(), peak)
            parts.append(embed_features(self.backend, open_part, size, timings, later=complete > 0))
        return np.concatenate(parts), token_count(changed * size)

    def peak(self, n: int) -> float:
        """The clamp peak of samples[:n]: their loudest log10 mel bin, or the stream's before them."""
        raw, settled = self.features(n)
        return self._peak(raw, settled)

    def _peak(self, raw: np.ndarray, settled: int) -> float:
        return max(self.peak_before, float(self.frame_peak[:settled].max(initial=-np.inf)),
                   float(raw[:, settled:].max(initial=-np.inf)))

    @staticmethod
    def _still_valid(entry, floor: np.float32) -> bool:
        """A cached window keeps its features when the floor did not move, or moved only below its bins."""
        _, old_floor, lowest = entry
        return old_floor == floor or lowest >= max(old_floor, floor)


class _Segment:
    """One segment's state: its audio, the official policy's raw output, and its prompt."""

    def __init__(self, backend, window_frames: int, context: str, offset: int, peak_before: float):
        self.audio = SegmentAudio(backend, window_frames, peak_before)
        self.context = context
        self.offset = offset  # samples of the stream before this segment
        self.chunk_id = 0
        self.raw = ""
        self.language = ""
        self.text = ""
        self.prompt: list[int] = []
        self.energy = np.empty(0, dtype=np.float32)  # dB per 10 ms frame, for the pause detector
        self.searched = 0  # energy frames already searched for a pause

    def append(self, samples: np.ndarray) -> None:
        self.audio.append(samples)
        fresh = frame_energy_db(self.audio.samples[len(self.energy) * HOP_LENGTH:], HOP_LENGTH)
        self.energy = np.concatenate([self.energy, fresh])

    def find_pause(self, after: int) -> int | None:
        """Sample index (in the segment) of the middle of the first pause that starts at or past
        sample `after`, or None (qasr.runtime.pauses: quiet relative to the segment's noise floor)."""
        need = int(PAUSE_SECONDS * SAMPLE_RATE / HOP_LENGTH)
        begin = max(after // HOP_LENGTH, self.searched)
        middle = first_pause(self.energy, need, begin)
        if middle is None:
            self.searched = max(begin, len(self.energy) - need)
            return None
        return middle * HOP_LENGTH


@dataclass
class _Options:
    language: str | None
    context: str
    chunk_samples: int
    unfixed_chunks: int
    unfixed_tokens: int
    max_new_tokens: int
    segment_samples: int
    incremental: bool
    timings: dict = field(default_factory=dict)


Steps = Generator[Sequence, None, list[StreamEvent]]


class Stream:
    """One live audio stream. feed() audio as it comes; finish() at its end.

    >>> stream = model.stream(language="English")
    >>> for event in stream.feed(samples):   # any number of 16 kHz samples
    ...     print(event.text)
    >>> print(stream.finish()[-1].text)

    `incremental=False` recomputes every step from scratch (the naive official re-feed; tests and
    benchmarks compare against it).
    """

    def __init__(self, model, language: str | None = None, context: str = "", chunk_seconds: float = 2.0,
                 unfixed_chunks: int = 2, unfixed_tokens: int = 5, max_new_tokens: int = MAX_NEW_TOKENS,
                 segment_seconds: float = SEGMENT_SECONDS, incremental: bool = True):
        if not chunk_seconds or chunk_seconds <= 0:
            raise UsageError(f"chunk_seconds must be positive, got {chunk_seconds}")
        if unfixed_chunks < 0 or unfixed_tokens < 0:
            raise UsageError("unfixed_chunks and unfixed_tokens must be 0 or more")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if segment_seconds < 0:
            raise UsageError(f"segment_seconds must be 0 (no segments) or more, got {segment_seconds}")
        self.model = model
        forced = check_language(language, model.languages) if language and str(language).strip() else None
        asr_prompt(context, forced)  # rejects a context with the audio placeholder now, not mid-stream
        self.options = _Options(forced, context or "", max(1, int(round(chunk_seconds * SAMPLE_RATE))),
                                int(unfixed_chunks), int(unfixed_tokens), int(max_new_tokens),
                                int(round(segment_seconds * SAMPLE_RATE)), incremental)
        self.pad_id = model.tokenizer.token_id(AUDIO_PAD)
        self.buffer = np.empty(0, dtype=np.float32)
        self.closed: list[tuple[str, str]] = []  # (language, text) of closed segments
        self.segment = self._new_segment(0, -np.inf)
        self.chunks = 0
        self.finished = False
        self.generated: list[int] = []  # ids the last step generated
        self.last_embeddings: np.ndarray | None = None  # audio embeddings of the last step
        self._resampler = None
        self._input_rate = SAMPLE_RATE

    @property
    def timings(self) -> dict:
        """Seconds per stage over the whole stream: frontend, encoder, setup, prefill, decode."""
        return self.options.timings

    @property
    def committed(self) -> str:
        return _join([text for _, text in self.closed])

    def feed(self, samples, sample_rate: int = SAMPLE_RATE) -> list[StreamEvent]:
        """Buffer `samples` (float in [-1, 1], or int16); run one step per full chunk."""
        return run_steps(self.model.engine, self.feed_steps(samples, sample_rate))

    def finish(self) -> list[StreamEvent]:
        """Flush the tail (shorter than a chunk) and end the stream; the last event has final=True."""
        return run_steps(self.model.engine, self.finish_steps())

    def feed_steps(self, samples, sample_rate: int = SAMPLE_RATE) -> Steps:
        """feed() as work for the model's batch engine, beside other requests (the server's): it
        yields each step's decoder request, to be decoded before it resumes, and returns the events."""
        self._check_open()
        self.buffer = np.concatenate([self.buffer, self._resample(self._samples(samples), sample_rate, last=False)])
        events = []
        while len(self.buffer) >= self.options.chunk_samples:
            chunk, self.buffer = np.split(self.buffer, [self.options.chunk_samples])
            events.append((yield from self._step(chunk, final=False)))
        return events

    def finish_steps(self) -> Steps:
        """finish() as work for the model's batch engine (see feed_steps)."""
        self._check_open()
        if self._resampler is not None:
            self.buffer = np.concatenate([self.buffer, self._resample(np.empty(0, np.float32), self._input_rate,
                                                                      last=True)])
        self.finished = True
        if len(self.buffer) == 0:  # as the official flush: nothing left, the last step's result stands
            self.closed.append((self.segment.language, self.segment.text))
            event = self._event(final=True, seconds=0.0)
        else:
            tail, self.buffer = self.buffer, np.empty(0, dtype=np.float32)
            event = yield from self._step(tail, final=True)
        self.model.engine.release(self)
        return [event]

    def _check_open(self) -> None:
        if self.finished:
            raise UsageError("this stream is finished; start a new one")

    def _samples(self, samples) -> np.ndarray:
        x = np.asarray(samples)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        x = np.ascontiguousarray(x.reshape(-1), dtype=np.float32)
        if not np.isfinite(x).all():
            raise AudioError("<stream>: samples are not finite (NaN or Inf)")
        return x

    def _resample(self, x: np.ndarray, rate, last: bool) -> np.ndarray:
        """16 kHz samples of `x`; other rates through one soxr stream (HQ, as load_audio resamples)."""
        if rate == SAMPLE_RATE and self._resampler is None:
            return x
        if not isinstance(rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise AudioError(f"<stream>: unsupported sample rate {rate!r} "
                             f"(expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
        if self._resampler is None:
            self._resampler, self._input_rate = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                                    quality="HQ"), rate
        elif rate != self._input_rate:
            raise UsageError(f"<stream>: sample rate changed from {self._input_rate} to {rate} Hz mid-stream")
        return self._resampler.resample_chunk(x, last=last)

    def _new_segment(self, offset: int, peak_before: float) -> _Segment:
        tail = self.committed[-CONTEXT_CHARS:] if offset else ""
        context = "\n".join(part for part in (self.options.context, tail) if part)
        return _Segment(self.model.backend, self.model.window_frames, context, offset, peak_before)

    def _step(self, chunk: np.ndarray, final: bool) -> Generator[Sequence, None, StreamEvent]:
        start = time.perf_counter()
        segment = self.segment
        segment.append(chunk)
        self.chunks += 1
        n = len(segment.audio.samples)
        cut = self._cut_point(segment) if not final else None
        if n >= HOP_LENGTH or not segment.offset:  # a last segment of a few carried samples holds no words
            yield from self._decode(segment, cut or n, final=final or cut is not None)
        if cut is not None:
            self.closed.append((segment.language, segment.text))
            carry = segment.audio.samples[cut:]
            self.segment = self._new_segment(segment.offset + cut, segment.audio.peak(cut))
            self.buffer = np.concatenate([carry, self.buffer])
        elif final:
            self.closed.append((segment.language, segment.text))
        return self._event(final=final, seconds=time.perf_counter() - start)

    def _cut_point(self, segment: _Segment) -> int | None:
        """Where the segment closes in this step: at a pause past segment_seconds, else at twice that."""
        limit = self.options.segment_samples
        n = len(segment.audio.samples)
        if not limit or n < limit:
            return None
        pause = segment.find_pause(limit)
        if pause is not None:
            return pause
        return n if n >= 2 * limit else None

    def _decode(self, segment: _Segment, n: int, final: bool) -> Generator[Sequence, None, None]:
        """One step of the official policy on the segment's first n samples (yields its decoder request)."""
        options, model = self.options, self.model
        prefix = ""
        if segment.chunk_id >= options.unfixed_chunks:
            prefix = rollback_prefix(model.tokenizer, segment.raw, options.unfixed_tokens, final)
        if options.incremental:
            embeds, changed = segment.audio.embeddings(n, options.timings)
        else:
            embeds, changed = embed_audio(model.backend, segment.audio.samples[:n], model.window_frames,
                                          options.timings, "<stream>", peak=segment.audio.peak_before), 0
        ids = model.tokenizer.encode(asr_prompt(segment.context, options.language) + prefix)
        prompt = expand_audio(ids, self.pad_id, len(embeds))
        keep = min(prompt.index(self.pad_id) + changed, len(os.path.commonprefix([prompt, segment.prompt])))
        sequence = Sequence(prompt, embeds, model.audio_token, options.max_new_tokens, model.eos_ids,
                            keep=keep, owner=self if options.incremental else None)
        yield sequence
        if sequence.error:
            raise sequence.error
        decoded = sequence.result
        for stage in ("setup", "prefill", "decode"):
            add_time(options.timings, stage, getattr(decoded, f"{stage}_seconds"))
        segment.prompt = prompt
        segment.raw = prefix + model.tokenizer.decode(decoded.tokens)
        segment.language, segment.text = parse_output(segment.raw, options.language)
        segment.chunk_id += 1
        self.generated, self.last_embeddings = decoded.tokens, embeds

    def _event(self, final: bool, seconds: float) -> StreamEvent:
        languages = [lang for lang, _ in self.closed]
        texts = [text for _, text in self.closed]
        if not final:
            languages.append(self.segment.language)
            texts.append(self.segment.text)
        text = _join(texts)
        heard = self.segment.offset + len(self.segment.audio.samples)
        return StreamEvent(chunk=self.chunks, audio_seconds=heard / SAMPLE_RATE,
                           language=merge_languages(languages), text=text,
                           committed=text if final else self.committed, final=final, compute_seconds=seconds)


def _join(texts: list[str]) -> str:
    """Segment texts joined as one transcript: a space between two that would otherwise run
    together in a spaced script ('end.' + 'Next'), nothing between CJK ones."""
    out = ""
    for text in texts:
        if out and text and not out[-1].isspace() and not text[0].isspace() and (out[-1].isascii() or text[0].isascii()):
            out += " "
        out += text
    return out
