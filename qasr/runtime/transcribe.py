"""Audio in, text out: the ASR pipeline over any backend.

load_audio -> log_mel -> encoder windows (in batches) -> projector -> prompt -> greedy decode ->
parse. Audio up to 20 minutes goes through in one pass, as the official package does; longer
audio is cut at the quietest point near each 20-minute mark and the parts joined (each 180 s
when word times are asked for, as the aligner's limit). A token budget that runs out is
reported in `Transcript.truncated`, never hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from qasr.errors import BundleError, QasrError
from qasr.runtime.align import MAX_SECONDS as ALIGN_SECONDS
from qasr.runtime.align import Aligner
from qasr.runtime.audio import SAMPLE_RATE, load_audio, source_path, split_long_audio
from qasr.runtime.backend import Backend, open_backend
from qasr.runtime.bundle import Bundle
from qasr.runtime.resolve import DEFAULT_MODEL, resolve_model
from qasr.runtime.decode import greedy_decode, token_budget
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

    @classmethod
    def load(cls, model: str | Path = DEFAULT_MODEL, backend: str = "auto", threads: int | None = None,
             weights: str = "fp32") -> Transcriber:
        """`model` is a bundle, a checkpoint directory or a Hugging Face id (`owner/name[@revision]`);
        a checkpoint is exported to a bundle at `weights` once, on first use, and cached."""
        loaded = Bundle.load(resolve_model(model, "asr", weights))
        return cls(loaded, open_backend(loaded, backend, threads))

    @property
    def languages(self) -> list[str]:
        return self.bundle.languages

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
        forced = check_language(language, self.languages) if language else None
        start = time.perf_counter()
        wave = load_audio(audio, sample_rate)
        name = source_path(audio)
        timings = {"audio": time.perf_counter() - start}
        parts = split_long_audio(wave, ALIGN_SECONDS if aligner else MAX_SECONDS)
        texts, languages, tokens, words, truncated = [], [], [], [], False
        for piece, offset in parts:
            embeds = embed_audio(self.backend, piece, self.window_frames, timings, name or "<audio>")
            budget = max_new_tokens or token_budget(len(piece) / SAMPLE_RATE)
            decoded = self._decode(embeds, context, forced, budget, timings, progress, on_token)
            found, text = parse_output(self.tokenizer.decode(decoded.tokens), forced)
            if aligner and text.strip():
                start_align = time.perf_counter()
                words += aligner.align_units(piece, split_units(text, found), offset, source=name or "<audio>")
                add_time(timings, "align", time.perf_counter() - start_align)
            texts.append(text)
            languages.append(found)
            tokens += decoded.tokens
            truncated |= not decoded.stopped
        duration = len(wave) / SAMPLE_RATE
        timings["total"] = time.perf_counter() - start
        timings["rtf"] = timings["total"] / duration
        return Transcript(text="".join(texts), language=merge_languages(languages), token_ids=tokens,
                          audio=name, duration=duration, words=words if aligner else None, timings=timings,
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

    def transcribe_many(self, audios: Iterable, **options) -> Iterator[tuple[object, Transcript | QasrError]]:
        """(audio, result) for each recording in turn; a bad one yields its error and the rest go on."""
        for audio in audios:
            try:
                yield audio, self.transcribe(audio, **options)
            except QasrError as exc:
                yield audio, exc

    def _decode(self, embeds, context, language, budget, timings, progress, on_token=None):
        prompt = prompt_ids(self.tokenizer, context, language, len(embeds))
        start = time.perf_counter()
        with (_Progress(self.tokenizer, budget, on_token) if progress else nullcontext()) as bar:
            decoded = greedy_decode(self.backend, prompt, embeds, self.audio_token, budget, self.eos_ids,
                                    on_token=bar.update if bar else on_token)
        add_time(timings, "setup", decoded.setup_seconds)
        add_time(timings, "prefill", decoded.prefill_seconds)
        add_time(timings, "decode", time.perf_counter() - start - decoded.setup_seconds - decoded.prefill_seconds)
        return decoded


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
