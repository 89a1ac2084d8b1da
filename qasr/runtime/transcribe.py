"""Audio in, text out: the ASR pipeline over any backend.

load_audio -> log_mel -> encoder windows (in batches) -> projector -> prompt -> greedy decode ->
parse. Audio up to 20 minutes goes through in one pass, as the official package does; longer
audio is cut at the quietest point near each 20-minute mark and the parts joined. A token budget
that runs out is reported in `Transcript.truncated`, never hidden.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from qasr.errors import AudioError, BundleError
from qasr.kernels.fbank import log_mel
from qasr.runtime.audio import SAMPLE_RATE, load_audio, split_long_audio
from qasr.runtime.backend import Backend, open_backend
from qasr.runtime.bundle import Bundle
from qasr.runtime.decode import greedy_decode, token_budget
from qasr.runtime.formats import Transcript
from qasr.runtime.prompt import check_language, merge_languages, parse_output, prompt_ids
from qasr.runtime.tokenizer import Tokenizer
from qasr.runtime.windows import join_windows, split_windows

MAX_SECONDS = 1200  # the official one-pass limit; longer audio is split near each mark
WINDOW_BATCH = 8  # encoder windows per call: 64 s of audio, bounds the encoder's memory


class Transcriber:
    """A loaded ASR bundle on one backend.

    >>> model = Transcriber.load("bundles/qwen3-asr-0.6b")
    >>> model.transcribe("meeting.wav", language="English").text
    """

    def __init__(self, bundle: Bundle, backend: Backend):
        if bundle.kind != "asr":
            raise BundleError(f"{bundle.path}: a {bundle.kind} bundle, not a speech recognition model")
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = Tokenizer.from_dir(bundle.path)
        self.audio_token = int(bundle.tokens["audio"])
        self.eos_ids = tuple(bundle.tokens["eos"])
        self.window_frames = int(bundle.manifest["audio"]["window_frames"])

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "auto", threads: int | None = None) -> Transcriber:
        loaded = Bundle.load(bundle)
        return cls(loaded, open_backend(loaded, backend, threads))

    @property
    def languages(self) -> list[str]:
        return self.bundle.languages

    def encode(self, audio, sample_rate: int | None = None) -> np.ndarray:
        """Audio embeddings [N, hidden] that replace the <|audio_pad|> rows of the prompt."""
        wave = load_audio(audio, sample_rate)
        return self._embed(wave, _source(audio) or "<audio>", {})

    def transcribe(self, audio, language: str | None = None, context: str = "",
                   max_new_tokens: int | None = None, sample_rate: int | None = None,
                   progress: bool = False) -> Transcript:
        """Transcribe one recording (a path, bytes, a binary file, or an array with its rate).

        `language` forces the output language (else it is identified); `context` is background
        text (names, terms, a previous transcript) the model may use; `max_new_tokens` caps the
        budget, which otherwise grows with the audio.
        """
        forced = check_language(language, self.languages) if language else None
        start = time.perf_counter()
        wave = load_audio(audio, sample_rate)
        timings = {"load": time.perf_counter() - start}
        parts = split_long_audio(wave, MAX_SECONDS)
        texts, languages, tokens, truncated = [], [], [], False
        for piece, _offset in parts:
            embeds = self._embed(piece, _source(audio) or "<audio>", timings)
            budget = token_budget(len(piece) / SAMPLE_RATE)
            budget = min(budget, max_new_tokens) if max_new_tokens else budget
            decoded = self._decode(embeds, context, forced, budget, timings, progress)
            found, text = parse_output(self.tokenizer.decode(decoded.tokens), forced)
            texts.append(text)
            languages.append(found)
            tokens += decoded.tokens
            truncated |= not decoded.stopped
        duration = len(wave) / SAMPLE_RATE
        timings["total"] = time.perf_counter() - start
        timings["rtf"] = timings["total"] / duration
        return Transcript(text="".join(texts), language=merge_languages(languages), token_ids=tokens,
                          audio=_source(audio), duration=duration, timings=timings, truncated=truncated)

    def _embed(self, wave: np.ndarray, source: str, timings: dict) -> np.ndarray:
        start = time.perf_counter()
        mel = log_mel(wave)
        if mel.shape[1] == 0:
            raise AudioError(f"{source}: too short to transcribe ({len(wave)} samples; at least 160 needed)")
        windows, frames, conv_frames = split_windows(mel, self.window_frames)
        _add(timings, "frontend", time.perf_counter() - start)
        start = time.perf_counter()
        hidden = np.concatenate([
            self.backend.encode(windows[i : i + WINDOW_BATCH], frames[i : i + WINDOW_BATCH],
                                conv_frames[i : i + WINDOW_BATCH])
            for i in range(0, len(windows), WINDOW_BATCH)
        ])
        embeds = self.backend.project(join_windows(hidden, frames))
        _add(timings, "encoder", time.perf_counter() - start)
        return embeds

    def _decode(self, embeds, context, language, budget, timings, progress):
        prompt = prompt_ids(self.tokenizer, context, language, len(embeds))
        start = time.perf_counter()
        bar = _progress(budget) if progress else nullcontext()
        with bar as tick:
            decoded = greedy_decode(self.backend, prompt, embeds, self.audio_token, budget, self.eos_ids,
                                    on_token=(lambda _: tick.update()) if tick else None)
        _add(timings, "prefill", decoded.prefill_seconds)
        _add(timings, "decode", time.perf_counter() - start - decoded.prefill_seconds)
        return decoded


def _add(timings: dict, key: str, value: float) -> None:
    timings[key] = timings.get(key, 0) + value


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="decoding", leave=False)


def _source(audio) -> str | None:
    return str(audio) if isinstance(audio, (str, Path)) else None
