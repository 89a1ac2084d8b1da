"""How to transcribe a recording: the options the CLI, the Python API and the server all pass down.

One object from the entry point to the batch engine, so an option is added in one place and the
batch path cannot drift from the one-at-a-time path. The keyword form of `Transcriber.transcribe`
(`language="English"`) builds one of these at the entry and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qasr.runtime.align import Aligner


@dataclass(frozen=True)
class TranscribeOptions:
    """`language` forces the output language (else it is identified); `context` is background text
    (names, terms, a previous transcript) the model may use; `max_new_tokens` is the token budget
    of each pass (None: it grows with the audio, 32 + 10 per second); `sample_rate` is the rate of
    an array given without one; `aligner` adds word times (the audio is then cut into parts of at
    most 180 s, as the official package does for timestamps); `loop_guard` ends a repetition loop
    early and continues its ids to the budget (qasr.runtime.decode.LoopGuard: opt-in)."""

    language: str | None = None
    context: str = ""
    max_new_tokens: int | None = None
    sample_rate: int | None = None
    aligner: Aligner | None = None
    loop_guard: bool = False

    def with_fields(self, **fields) -> TranscribeOptions:
        """A copy with `fields` changed; an unknown name is a TypeError, as for any wrong keyword."""
        return dataclasses.replace(self, **fields) if fields else self
