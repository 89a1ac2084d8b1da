"""Audio in, text out: the ASR pipeline over any backend.

load_audio -> log_mel -> encoder windows (in batches) -> projector -> prompt -> greedy decode ->
parse. Many recordings decode side by side with `transcribe_many(batch_size=N)`
(qasr.runtime.batcher). Audio up to 20 minutes goes through in one pass, as the official package
does; longer audio is cut at the quietest point near each 20-minute mark and the parts joined (each 180 s
when word times are asked for, as the aligner's limit). A token budget that runs out is
reported in `Transcript.truncated`, never hidden.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

import numpy as np
from tqdm import tqdm

from qasr.errors import QasrError
from qasr.runtime.align import MAX_SECONDS as ALIGN_SECONDS
from qasr.runtime.audio import SAMPLE_RATE, load_audio, source_path, split_long_audio
from qasr.runtime.backends.interface import Backend
from qasr.runtime.batch import BatchDecoder, decode_alone
from qasr.runtime.batcher import Batcher, Recording
from qasr.runtime.bundle import AUDIO_GRAPHS, Bundle
from qasr.runtime.decode import Sequence, token_budget
from qasr.runtime.embed import add_time, embed_audio
from qasr.runtime.loaded import LoadedModel
from qasr.runtime.options import TranscribeOptions
from qasr.runtime.prompt import check_language, merge_languages, parse_output, prompt_ids
from qasr.runtime.resolve import DEFAULT_MODEL
from qasr.runtime.results import Transcript
from qasr.runtime.stream import MAX_NEW_TOKENS, SEGMENT_SECONDS, Stream
from qasr.runtime.timestamps import split_units
from qasr.runtime.tokenizer import IncrementalDecoder, Tokenizer

MAX_SECONDS = 1200  # the official one-pass limit; longer audio is split near each mark
_END = object()  # the end of transcribe_many's input


class Transcriber(LoadedModel):
    """A loaded ASR bundle on one backend.

    >>> model = Transcriber.load()  # Qwen/Qwen3-ASR-0.6B; or a bundle, a checkpoint dir, a hub id
    >>> model.transcribe("meeting.wav", language="English").text
    """

    kind, default = "asr", DEFAULT_MODEL

    def __init__(self, bundle: Bundle, backend: Backend, tokenizer: Tokenizer | None = None):
        super().__init__(bundle, backend, tokenizer)
        self.audio_token = int(bundle.tokens["audio"])
        self.eos_ids = tuple(bundle.tokens["eos"])
        self._engine: BatchDecoder | None = None

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

    def transcribe(self, audio, options: TranscribeOptions | None = None, *, progress: bool = False,
                   on_token: Callable[[int], None] | None = None, release_encoder: bool = False,
                   **fields) -> Transcript:
        """Transcribe one recording (a path, bytes, a binary file, or an array with its rate).

        `options` (TranscribeOptions), or its fields as keywords (`language="English"`,
        `max_new_tokens=64`, ...): the language, context, token budget, aligner and loop guard.
        `progress` shows a bar on stderr; `on_token` sees each generated id as it comes (the
        server streams text from it). `release_encoder` frees the audio encoder once the recording
        is encoded (release_encoder()), for a process with nothing more to transcribe.
        """
        recording = self.prepare(audio, (options or TranscribeOptions()).with_fields(**fields))
        if recording.error:
            raise recording.error
        for index in range(len(recording.parts)):
            sequence = self.request(recording, index)
            if release_encoder and index == len(recording.parts) - 1:
                self.release_encoder()
            with (_Progress(self.tokenizer, sequence.budget, on_token) if progress else nullcontext()) as bar:
                sequence.on_token = bar.update if bar else on_token
                recording.decoded[index] = decode_alone(self.engine, sequence)
        return self.finish(recording)

    def transcribe_many(self, audios: Iterable, options: TranscribeOptions | None = None, batch_size: int = 1,
                        progress: bool = False, release_encoder: bool = False,
                        **fields) -> Iterator[tuple[object, Transcript | QasrError]]:
        """(audio, result) for each recording, in input order; a bad one yields its error and the rest go on.

        `batch_size` > 1 decodes up to that many recordings per step (continuous batching: a
        recording joins the batch as soon as a row is free and leaves at its end of sequence);
        the ids are those of one at a time. `options` and `fields` are transcribe's; `progress`
        is shown only one at a time. `release_encoder` frees the audio encoder once the last
        recording is encoded (release_encoder()); one at a time, each recording is then taken from
        `audios` before the one before it is transcribed, to know which is the last.
        """
        options = (options or TranscribeOptions()).with_fields(**fields)
        audios = iter(audios)
        if batch_size > 1:
            yield from self._batched(audios, batch_size, options, release_encoder)
            return
        for audio, last in _marking_last(audios) if release_encoder else ((audio, False) for audio in audios):
            try:
                yield audio, self.transcribe(audio, options, progress=progress, release_encoder=last)
            except QasrError as exc:
                yield audio, exc

    def release_encoder(self) -> None:
        """Free the audio encoder and projector (0.35 GB for the 1.7B's int8 encoder) until the next
        recording, which loads them again: a command that has encoded its last input decodes without
        them. Engines that cannot free a graph keep it."""
        self.backend.release(AUDIO_GRAPHS)

    def _batched(self, audios: Iterator, batch_size: int, options: TranscribeOptions,
                 release_encoder: bool) -> Iterator[tuple[object, Transcript | QasrError]]:
        """The next recording is read and encoded when a row frees up; results leave in input order."""
        batcher = Batcher(self, batch_size)
        order: deque[Recording] = deque()  # in input order, not yet yielded
        audio = next(audios, _END)
        while audio is not _END or not batcher.idle:
            while batcher.fill() and audio is not _END:
                order.append(batcher.open(audio, options))
                audio = next(audios, _END)
            batcher.step()
            if release_encoder and audio is _END and not batcher.parts:
                self.release_encoder()
                release_encoder = False
            while order and order[0].result is not None:
                recording = order.popleft()
                yield recording.audio, recording.result

    def prepare(self, audio, options: TranscribeOptions) -> Recording:
        """Check the options and read the recording; cut it into the parts decoded one pass each.
        What is wrong with either is kept in the Recording's `error`, for the caller to raise or
        report beside the other recordings."""
        start = time.perf_counter()
        try:
            forced = check_language(options.language, self.languages) if options.language else None
            wave = load_audio(audio, options.sample_rate)
        except QasrError as exc:
            return Recording(audio, None, np.zeros(0, dtype=np.float32), None, start, options, error=exc)
        recording = Recording(audio, source_path(audio), wave, forced, start, options)
        recording.timings["audio"] = time.perf_counter() - start
        recording.parts = split_long_audio(wave, ALIGN_SECONDS if options.aligner else MAX_SECONDS)
        recording.decoded = [None] * len(recording.parts)
        return recording

    def request(self, recording: Recording, index: int) -> Sequence:
        """Part `index` of the recording, encoded, as a request for the decoder."""
        piece, options = recording.parts[index][0], recording.options
        embeds = embed_audio(self.backend, piece, self.window_frames, recording.timings, recording.name or "<audio>")
        budget = options.max_new_tokens or token_budget(len(piece) / SAMPLE_RATE)
        prompt = prompt_ids(self.tokenizer, options.context, recording.forced, len(embeds))
        return Sequence(prompt, embeds, self.audio_token, budget, self.eos_ids, loop_guard=options.loop_guard)

    def finish(self, recording: Recording) -> Transcript:
        """Parse each part's ids, add word times, join the parts."""
        texts, languages, tokens, words, truncated = [], [], [], [], False
        timings, aligner = recording.timings, recording.options.aligner
        for (piece, offset), decoded in zip(recording.parts, recording.decoded):
            assert decoded is not None
            for key, seconds in (("setup", decoded.setup_seconds), ("prefill", decoded.prefill_seconds),
                                 ("decode", decoded.decode_seconds)):
                add_time(timings, key, seconds)
            found, text = parse_output(self.tokenizer.decode(decoded.tokens), recording.forced)
            if aligner and text.strip():
                start_align = time.perf_counter()
                words += aligner.align_units(piece, split_units(text, found), offset,
                                             source=recording.name or "<audio>")
                add_time(timings, "align", time.perf_counter() - start_align)
            texts.append(text)
            languages.append(found)
            tokens += decoded.tokens
            truncated |= not decoded.stopped
        duration = len(recording.wave) / SAMPLE_RATE
        timings["total"] = time.perf_counter() - recording.start
        timings["rtf"] = timings["total"] / duration
        return Transcript(text="".join(texts), language=merge_languages(languages), token_ids=tokens,
                          audio=recording.name, duration=duration, words=words if aligner else None, timings=timings,
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



def _marking_last(items: Iterator) -> Iterator[tuple[object, bool]]:
    """Each item with whether it is the last, read one ahead."""
    item = next(items, _END)
    while item is not _END:
        following = next(items, _END)
        yield item, following is _END
        item = following


class _Progress:
    """A progress bar over the token budget that shows the end of the text written so far."""

    def __init__(self, tokenizer: Tokenizer, budget: int, on_token: Callable[[int], None] | None = None):
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
