"""Audio in, text out: the ASR pipeline over any backend.

load_audio -> log_mel -> encoder windows (in batches) -> projector -> prompt -> greedy decode ->
parse. Many recordings decode side by side with `transcribe_many(batch_size=N)`
(qasr.runtime.batch). Audio up to 20 minutes goes through in one pass, as the official package
does; longer audio is cut at the quietest point near each 20-minute mark and the parts joined (each 180 s
when word times are asked for, as the aligner's limit). A token budget that runs out is
reported in `Transcript.truncated`, never hidden.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qasr.errors import BundleError, QasrError
from qasr.runtime.align import MAX_SECONDS as ALIGN_SECONDS
from qasr.runtime.align import Aligner
from qasr.runtime.audio import SAMPLE_RATE, load_audio, source_path, split_long_audio
from qasr.runtime.backend import Backend, open_backend
from qasr.runtime.bundle import Bundle
from qasr.runtime.resolve import DEFAULT_MODEL, resolve_model
from qasr.runtime.batch import BatchDecoder, decode_alone
from qasr.runtime.decode import Decoded, Sequence, token_budget
from qasr.runtime.embed import add_time, embed_audio
from qasr.runtime.formats import Transcript
from qasr.runtime.prompt import check_language, merge_languages, parse_output, prompt_ids
from qasr.runtime.stream import MAX_NEW_TOKENS, SEGMENT_SECONDS, Stream
from qasr.runtime.timestamps import split_units
from qasr.runtime.tokenizer import IncrementalDecoder, Tokenizer

MAX_SECONDS = 1200  # the official one-pass limit; longer audio is split near each mark


class Transcriber:
    """A loaded ASR bundle on one backend.

    >>> model = Transcriber.load()  # Qwen/Qwen3-ASR-0.6B; or a bundle, a checkpoint dir, a hub id
    >>> model.transcribe("meeting.wav", language="English").text
    """

    def __init__(self, bundle: Bundle, backend: Backend):
        if bundle.kind != "asr":
            raise BundleError(f"{bundle.path}: a forced-aligner bundle, not a speech recognition model")
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = Tokenizer.from_dir(bundle.path)
        self.audio_token = int(bundle.tokens["audio"])
        self.eos_ids = tuple(bundle.tokens["eos"])
        self.window_frames = int(bundle.manifest["audio"]["window_frames"])
        self._engine: BatchDecoder | None = None

    @classmethod
    def load(cls, model: str | Path = DEFAULT_MODEL, backend: str = "auto", threads: int | None = None,
             weights: str = "fp32", encoder_weights: str = "fp32") -> Transcriber:
        """`model` is a bundle, a checkpoint directory or a Hugging Face id (`owner/name[@revision]`);
        a checkpoint is exported to a bundle at `weights` (and `encoder_weights`) once, on first use,
        and cached."""
        loaded = Bundle.load(resolve_model(model, "asr", weights, encoder_weights=encoder_weights))
        return cls(loaded, open_backend(loaded, backend, threads))

    @property
    def languages(self) -> list[str]:
        return self.bundle.languages

    @property
    def engine(self) -> BatchDecoder:
        """The batch engine that drives the backend for everything this model decodes, so a stream's
        cache rows survive between its steps, beside a batch of other requests or not."""
        if self._engine is None or self._engine.backend is not self.backend:
            self._engine = BatchDecoder(self.backend, max_batch=1)
        return self._engine

    def encode(self, audio, sample_rate: int | None = None) -> np.ndarray:
        """Audio embeddings [N, hidden] that replace the <|audio_pad|> rows of the prompt."""
        wave = load_audio(audio, sample_rate)
        return embed_audio(self.backend, wave, self.window_frames, source=source_path(audio) or "<audio>")

    def transcribe(self, audio, language: str | None = None, context: str = "",
                   max_new_tokens: int | None = None, sample_rate: int | None = None,
                   aligner: Aligner | None = None, progress: bool = False,
                   on_token: Callable[[int], None] | None = None) -> Transcript:
        """Transcribe one recording (a path, bytes, a binary file, or an array with its rate).

        `language` forces the output language (else it is identified); `context` is background
        text (names, terms, a previous transcript) the model may use; `max_new_tokens` is the
        token budget of each pass, as in the official package (by default it grows with the
        audio: 32 + 10 per second); `aligner` adds word times (the audio is
        then cut into parts of at most 180 s, as the official package does for timestamps);
        `on_token` sees each generated id as it comes (the server streams text from it).
        """
        job = self._open(audio, language, sample_rate, aligner)
        for index in range(len(job.parts)):
            sequence = self._sequence(job, index, context, max_new_tokens)
            with (_Progress(self.tokenizer, sequence.budget, on_token) if progress else nullcontext()) as bar:
                sequence.on_token = bar.update if bar else on_token
                job.decoded[index] = decode_alone(self.engine, sequence)
        return self._finish(job, aligner)

    def transcribe_many(self, audios: Iterable, batch_size: int = 1,
                        **options) -> Iterator[tuple[object, Transcript | QasrError]]:
        """(audio, result) for each recording, in input order; a bad one yields its error and the rest go on.

        `batch_size` > 1 decodes up to that many recordings per step (continuous batching: a
        recording joins the batch as soon as a row is free and leaves at its end of sequence);
        the ids are those of one at a time. `options` are transcribe's; `progress` is shown only
        one at a time.
        """
        if batch_size <= 1:
            for audio in audios:
                try:
                    yield audio, self.transcribe(audio, **options)
                except QasrError as exc:
                    yield audio, exc
            return
        yield from self._batched(iter(audios), batch_size, **options)

    def _batched(self, audios: Iterator, batch_size: int, language: str | None = None, context: str = "",
                 max_new_tokens: int | None = None, sample_rate: int | None = None,
                 aligner: Aligner | None = None, progress: bool = False) -> Iterator[tuple[object, Transcript | QasrError]]:
        """The next recording is read and encoded when a row frees up; results leave in input order."""
        batcher = Batcher(self, batch_size)
        order: deque[_Job] = deque()  # in input order, not yet yielded
        audio = next(audios, _END)
        while audio is not _END or not batcher.idle:
            while batcher.fill() and audio is not _END:
                order.append(batcher.open(audio, language, context, max_new_tokens, sample_rate, aligner))
                audio = next(audios, _END)
            batcher.step()
            while order and order[0].result is not None:
                job = order.popleft()
                yield job.audio, job.result

    def _open(self, audio, language: str | None, sample_rate: int | None, aligner: Aligner | None) -> _Job:
        """Check the options and read the recording; cut it into the parts decoded one pass each."""
        forced = check_language(language, self.languages) if language else None
        start = time.perf_counter()
        wave = load_audio(audio, sample_rate)
        job = _Job(audio, source_path(audio), wave, forced, start)
        job.timings["audio"] = time.perf_counter() - start
        job.parts = split_long_audio(wave, ALIGN_SECONDS if aligner else MAX_SECONDS)
        job.decoded = [None] * len(job.parts)
        return job

    def _open_or_fail(self, audio, language, sample_rate, aligner) -> _Job:
        try:
            return self._open(audio, language, sample_rate, aligner)
        except QasrError as exc:
            return _Job(audio, None, np.zeros(0, dtype=np.float32), None, time.perf_counter(), error=exc)

    def _sequence(self, job: _Job, index: int, context: str, max_new_tokens: int | None) -> Sequence:
        """Part `index` of the recording, encoded, as a request for the decoder."""
        piece = job.parts[index][0]
        embeds = embed_audio(self.backend, piece, self.window_frames, job.timings, job.name or "<audio>")
        budget = max_new_tokens or token_budget(len(piece) / SAMPLE_RATE)
        prompt = prompt_ids(self.tokenizer, context, job.forced, len(embeds))
        return Sequence(prompt, embeds, self.audio_token, budget, self.eos_ids)

    def _finish(self, job: _Job, aligner: Aligner | None) -> Transcript:
        """Parse each part's ids, add word times, join the parts."""
        texts, languages, tokens, words, truncated = [], [], [], [], False
        timings = job.timings
        for (piece, offset), decoded in zip(job.parts, job.decoded):
            assert decoded is not None
            for key, seconds in (("setup", decoded.setup_seconds), ("prefill", decoded.prefill_seconds),
                                 ("decode", decoded.decode_seconds)):
                add_time(timings, key, seconds)
            found, text = parse_output(self.tokenizer.decode(decoded.tokens), job.forced)
            if aligner and text.strip():
                start_align = time.perf_counter()
                words += aligner.align_units(piece, split_units(text, found), offset, source=job.name or "<audio>")
                add_time(timings, "align", time.perf_counter() - start_align)
            texts.append(text)
            languages.append(found)
            tokens += decoded.tokens
            truncated |= not decoded.stopped
        duration = len(job.wave) / SAMPLE_RATE
        timings["total"] = time.perf_counter() - job.start
        timings["rtf"] = timings["total"] / duration
        return Transcript(text="".join(texts), language=merge_languages(languages), token_ids=tokens,
                          audio=job.name, duration=duration, words=words if aligner else None, timings=timings,
                          truncated=truncated)

    def stream(self, language: str | None = None, context: str = "", chunk_seconds: float = 2.0,
               unfixed_chunks: int = 2, unfixed_tokens: int = 5, max_new_tokens: int = MAX_NEW_TOKENS,
               segment_seconds: float = SEGMENT_SECONDS) -> Stream:
        """A live stream: feed() it audio as it arrives, read the text after every `chunk_seconds`.

        The official streaming policy (rollback of `unfixed_tokens` ids, no prefix for the first
        `unfixed_chunks` chunks, `max_new_tokens` per step), computed incrementally; segments of
        about `segment_seconds` (closed at a pause) keep an endless stream's cost flat, and 0
        turns them off (the official policy exactly, at a cost that grows with the stream).
        """
        return Stream(self, language=language, context=context, chunk_seconds=chunk_seconds,
                      unfixed_chunks=unfixed_chunks, unfixed_tokens=unfixed_tokens,
                      max_new_tokens=max_new_tokens, segment_seconds=segment_seconds)

    def _finish_or_fail(self, job: _Job, aligner: Aligner | None) -> Transcript | QasrError:
        try:
            return self._finish(job, aligner)
        except QasrError as exc:
            return exc


class Batcher:
    """Keeps one BatchDecoder full, for `transcribe_many` and the server: from whole recordings,
    and from streams' steps.

    A recording is opened (read, cut into parts) by `open`; its parts are encoded and join the
    engine as rows free up; when its last part ends it is finished (parsed, aligned, joined) at
    once, so a short request beside long ones is answered as soon as it is done. A stream's steps
    (`open_steps`) join the engine one at a time, each as the one before it ends, so streams and
    recordings whose steps coincide share them. One thread drives a Batcher (the backend is not
    thread-safe); the server adds work between steps.
    """

    def __init__(self, model: Transcriber, max_batch: int):
        self.model = model
        self.engine = model.engine
        self.engine.max_batch = max_batch
        self.parts: deque[tuple[_Job, int]] = deque()  # parts of opened recordings not yet in the engine
        self.owners: dict[int, tuple[_Job | _Steps, int, Sequence]] = {}  # id(sequence) -> its work, part, itself
        self.jobs: list[_Job | _Steps] = []  # opened and not yet finished

    @property
    def idle(self) -> bool:
        return not self.jobs

    def open(self, audio, language: str | None = None, context: str = "", max_new_tokens: int | None = None,
             sample_rate: int | None = None, aligner: Aligner | None = None,
             on_token: Callable[[int], None] | None = None, gone: Callable[[], bool] | None = None) -> _Job:
        """Take a recording (`transcribe`'s options); `gone()` true drops it between steps."""
        job = self.model._open_or_fail(audio, language, sample_rate, aligner)
        job.context, job.max_new_tokens, job.aligner, job.on_token, job.gone = (
            context, max_new_tokens, aligner, on_token, gone)
        self.parts.extend((job, index) for index in range(len(job.parts)))
        self.jobs.append(job)
        return job

    def open_steps(self, steps: Generator[Sequence, None, object], gone: Callable[[], bool] | None = None) -> _Steps:
        """Take work that yields decoder requests one at a time (Stream.feed_steps or finish_steps);
        its `result` is what the work returns, or the error it raised."""
        job = _Steps(steps, gone)
        self.jobs.append(job)
        self._advance(job)
        return job

    def fill(self) -> bool:
        """Encode waiting parts into free rows; whether a row is still free (room for another recording)."""
        while self.engine.active < self.engine.max_batch and self.parts:
            job, index = self.parts.popleft()
            if job.error:
                continue
            try:
                sequence = self.model._sequence(job, index, job.context, job.max_new_tokens)
            except QasrError as exc:
                job.error = exc
                continue
            sequence.on_token = job.on_token
            self.owners[id(sequence)] = job, index, sequence
            job.running += 1
            self.engine.add(sequence)
        return self.engine.active < self.engine.max_batch

    def step(self) -> list[_Job | _Steps]:
        """Fill free rows, drop work whose client left, one decode step; the work finished here,
        each with its `result` (a Transcript, a stream's events, or the error it met)."""
        self.fill()
        for job, _, sequence in list(self.owners.values()):
            if job.gone and job.gone():
                self._retire(self.engine.cancel(sequence, QasrError("the client went away")))
        for sequence in self.engine.step():
            self._retire(sequence)
        done = [job for job in self.jobs if job.complete]
        for job in done:
            self.jobs.remove(job)
            if isinstance(job, _Job):
                job.result = job.error or self.model._finish_or_fail(job, job.aligner)
        return done

    def _retire(self, sequence: Sequence) -> None:
        job, index, _ = self.owners.pop(id(sequence))
        if isinstance(job, _Steps):
            self._advance(job)
            return
        job.running -= 1
        job.error = job.error or sequence.error
        job.decoded[index] = sequence.result

    def _advance(self, job: _Steps) -> None:
        """Resume the work (its last request is decoded) up to its next request, or its end."""
        try:
            sequence = next(job.steps)
        except StopIteration as stop:
            job.result, job.complete = stop.value, True
            return
        except QasrError as exc:
            job.result, job.complete = exc, True
            return
        self.owners[id(sequence)] = job, -1, sequence
        self.engine.add(sequence)


@dataclass
class _Steps:
    """A stream's steps on their way through the batch."""

    steps: Generator[Sequence, None, object]
    gone: Callable[[], bool] | None = None
    result: object = None
    complete: bool = False


_END = object()


@dataclass
class _Job:
    """One recording on its way through: its parts, and what decoding them has given so far."""

    audio: object
    name: str | None
    wave: np.ndarray
    forced: str | None
    start: float
    error: QasrError | None = None
    parts: list[tuple[np.ndarray, float]] = field(default_factory=list)
    decoded: list[Decoded | None] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    running: int = 0  # parts in the engine
    context: str = ""
    max_new_tokens: int | None = None
    aligner: Aligner | None = None
    on_token: Callable[[int], None] | None = None
    gone: Callable[[], bool] | None = None
    result: Transcript | QasrError | None = None  # once finished

    @property
    def complete(self) -> bool:
        return not self.running and (self.error is not None or all(d is not None for d in self.decoded))


class _Progress:
    """A progress bar over the token budget that shows the end of the text written so far."""

    def __init__(self, tokenizer: Tokenizer, budget: int, on_token: Callable[[int], None] | None = None):
        from tqdm import tqdm

        self.on_token = on_token
        self.bar = tqdm(total=budget, unit="tok", desc="decoding", leave=False)
        self.text = IncrementalDecoder(tokenizer)
        self.tail = ""

    def update(self, token_id: int) -> None:
        self.tail = (self.tail + self.text.push(token_id))[-40:]
        self.bar.set_postfix_str(self.tail.replace("\n", " "), refresh=False)
        self.bar.update()
        if self.on_token:
            self.on_token(token_id)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
