"""Word and character timestamps with Qwen3-ForcedAligner.

The text is cut into units (words; single ideographs for Chinese; nagisa / soynlp words for
Japanese / Korean), each followed by two <timestamp> slots; one non-autoregressive pass of the
aligner graph gives a time class per slot (x 80 ms), repaired into a non-decreasing sequence.
"""

from __future__ import annotations

import numpy as np

from qasr.errors import UsageError
from qasr.runtime.audio import SAMPLE_RATE, load_audio, source_path
from qasr.runtime.backends.interface import Backend
from qasr.runtime.bundle import Bundle
from qasr.runtime.embed import embed_audio
from qasr.runtime.loaded import LoadedModel
from qasr.runtime.prompt import check_language
from qasr.runtime.resolve import DEFAULT_ALIGNER
from qasr.runtime.results import Word
from qasr.runtime.timestamps import aligner_ids, split_units, unit_times
from qasr.runtime.tokenizer import Tokenizer

MAX_SECONDS = 180  # the official split length when timestamps are asked for


class Aligner(LoadedModel):
    """A loaded aligner bundle on one backend.

    >>> aligner = Aligner.load()  # Qwen/Qwen3-ForcedAligner-0.6B; or a bundle, a checkpoint dir, a hub id
    >>> aligner.align("talk.wav", "Hello world.", "English")
    [Word(text='Hello', start=0.32, end=0.64), Word(text='world', start=0.72, end=1.12)]
    """

    kind, default = "aligner", DEFAULT_ALIGNER

    def __init__(self, bundle: Bundle, backend: Backend, tokenizer: Tokenizer | None = None):
        super().__init__(bundle, backend, tokenizer)
        self.segment_ms = float(bundle.manifest["aligner"]["segment_ms"])

    def align(self, audio, text: str, language: str, sample_rate: int | None = None) -> list[Word]:
        """Times of each unit of `text` in `audio` (up to 180 s; longer audio: transcribe --timestamps)."""
        language = check_language(language, self.languages)
        units = split_units(text, language)
        if not units:
            raise UsageError("nothing to align: the text has no letters or digits")
        wave = load_audio(audio, sample_rate)
        seconds = len(wave) / SAMPLE_RATE
        if seconds > MAX_SECONDS:
            raise UsageError(
                f"{source_path(audio) or '<audio>'}: {seconds:.0f} s of audio; the aligner times at most {MAX_SECONDS} s in one "
                "pass (beyond ~270 s its times collapse). Cut the audio and text, or let `qasr transcribe "
                "--timestamps` split it at quiet points"
            )
        return self.align_units(wave, units, source=source_path(audio) or "<audio>")

    def align_units(self, wave: np.ndarray, units: list[str], offset: float = 0.0, timings: dict | None = None,
                    source: str = "<audio>") -> list[Word]:
        """Times of `units` in a 16 kHz waveform, shifted by `offset` seconds (no checks, no split)."""
        if not units:
            return []
        embeds = embed_audio(self.backend, wave, self.window_frames, timings, source)
        ids = np.asarray([aligner_ids(self.tokenizer, units, len(embeds))], dtype=np.int64)
        classes, _ = self.backend.align(ids, embeds[None])
        return unit_times(units, classes.tolist(), self.segment_ms, offset)
