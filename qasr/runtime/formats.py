"""The output formats: plain text, JSON, SRT and WebVTT subtitles, in one registry (FORMATS).

Subtitle cues are built from the aligner's word times but take their text from the transcript
itself: the aligner's units have punctuation stripped (and Japanese units are normalised by
nagisa), so each unit is located in the original text and a cue shows the original characters,
punctuation and spacing included, from its first unit up to the next cue's first unit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from qasr.errors import UsageError
from qasr.runtime.results import Segment, Transcript, Word
from qasr.runtime.timestamps import unit_spans

SENTENCE_END = frozenset(".!?。！？．｡…‼⁇⁈⁉؟।")
MIN_CUE_MS = 500  # length of a cue whose words have none (see subtitle_segments)


def to_txt(t: Transcript) -> str:
    return t.text + "\n"


def to_json(t: Transcript) -> str:
    """One JSON object, UTF-8 text as is; `words` only when the aligner ran."""
    out: dict[str, object] = {
        "audio": t.audio, "language": t.language, "text": t.text, "token_ids": list(t.token_ids),
        "duration": t.duration, "timings": t.timings, "truncated": t.truncated,
    }
    if t.words is not None:
        out["words"] = [asdict(w) for w in t.words]
    return json.dumps(out, ensure_ascii=False) + "\n"


def to_srt(segments: list[Segment]) -> str:
    return "".join(
        f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n" for n, s in enumerate(segments, 1)
    )


def to_vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n" for s in segments)


def _clock(seconds: float, separator: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT); hours grow past two digits if needed."""
    hours, ms = divmod(round(seconds * 1000), 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def to_srt_file(t: Transcript) -> str:
    return to_srt(_segments(t))


def to_vtt_file(t: Transcript) -> str:
    return to_vtt(_segments(t))


def _segments(t: Transcript) -> list[Segment]:
    return subtitle_segments(t.text, t.words or [])  # render has refused subtitles without word times


@dataclass(frozen=True)
class Format:
    """One output format: the name `--format` takes (also the file extension), its writer, its
    media type, whether it needs word times, and the OpenAI `response_format` that returns it as
    plain text (None where OpenAI's own JSON shapes answer instead)."""

    name: str
    write: Callable[[Transcript], str]
    media_type: str
    needs_words: bool = False
    openai: str | None = None


# Every format, once: the CLI's choices, the server's response formats and the page's downloads come from here.
FORMATS = {f.name: f for f in (
    Format("txt", to_txt, "text/plain", openai="text"),
    Format("json", to_json, "application/json"),
    Format("srt", to_srt_file, "application/x-subrip", needs_words=True, openai="srt"),
    Format("vtt", to_vtt_file, "text/vtt", needs_words=True, openai="vtt"),
)}


def render(t: Transcript, name: str) -> str:
    """The transcript in format `name`; one line when the name is unknown or subtitles lack word times."""
    if name not in FORMATS:
        raise UsageError(f"unknown output format {name!r}; choose one of {', '.join(FORMATS)}")
    if FORMATS[name].needs_words and t.words is None:
        raise UsageError(f"{name} subtitles need word timestamps; run with the forced aligner")
    return FORMATS[name].write(t)


def subtitle_segments(text: str, words: list[Word], max_chars: int = 42, max_duration: float = 6.0) -> list[Segment]:
    """Subtitle cues from word times, with the transcript's own text.

    A cue ends after a word followed by sentence punctuation, or before a word that would make it
    longer than `max_chars` characters or `max_duration` seconds; one word longer than that gets
    a cue of its own. Text before the first word joins the first cue and text after the last
    word the last cue, so every character of `text` is shown once.

    Times are whole milliseconds: a cue runs from its first word's start to its last word's end,
    starts no earlier than the previous cue ends, and never has zero length: a cue with no length
    of its own lasts MIN_CUE_MS, or until the next cue's first word starts if that is sooner but
    still later. So even an aligner that gives every word the same instant yields ordered,
    non-overlapping cues, each MIN_CUE_MS long.
    """
    if max_chars < 1 or max_duration <= 0:
        raise UsageError(f"subtitle limits must be positive (max_chars={max_chars}, max_duration={max_duration})")
    if not words:
        return []
    cuts = unit_spans(text, [w.text for w in words])
    groups = _group(text, words, cuts, max_chars, max_duration)
    segments: list[Segment] = []
    previous_end = 0
    for g, (first, stop) in enumerate(groups):
        start = max(_ms(words[first].start), previous_end)
        end = max(_ms(w.end) for w in words[first:stop])
        if end <= start:
            following = _ms(words[groups[g + 1][0]].start) if g + 1 < len(groups) else start
            end = following if start < following < start + MIN_CUE_MS else start + MIN_CUE_MS
        piece = _cue_text(text[_cut(cuts, first, text): _cut(cuts, stop, text)])
        segments.append(Segment(start / 1000, end / 1000, piece or " ".join(w.text for w in words[first:stop])))
        previous_end = end
    return segments


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _group(text: str, words: list[Word], cuts: list[tuple[int, int]], max_chars: int,
           max_duration: float) -> list[tuple[int, int]]:
    """Word index ranges [first, stop) of the cues."""
    groups, first = [], 0
    for k in range(1, len(words)):
        sentence_end = _sentence_end(text[cuts[k - 1][1]: cuts[k][0]], words[k].text)
        too_long = len(_cue_text(text[_cut(cuts, first, text): _cut(cuts, k + 1, text)])) > max_chars
        if sentence_end or too_long or words[k].end - words[first].start > max_duration:
            groups.append((first, k))
            first = k
    groups.append((first, len(words)))
    return groups


def _sentence_end(gap: str, next_word: str) -> bool:
    """Sentence punctuation between two words; a lone '.' before a lower-case word ("U.S. economy") is not."""
    marks = {ch for ch in gap if ch in SENTENCE_END}
    return bool(marks) and not (marks == {"."} and next_word[:1].islower())


def _cut(cuts: list[tuple[int, int]], k: int, text: str) -> int:
    """Where the cue starting at word k starts in the text: the first cue at 0, past the last at the end."""
    if k == 0:
        return 0
    return cuts[k][0] if k < len(cuts) else len(text)


def _cue_text(piece: str) -> str:
    """One line: whitespace runs (newlines included) to one space; '-->' would end a cue's timing line."""
    return " ".join(piece.split()).replace("-->", "->")
