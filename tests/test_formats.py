"""Result writers and subtitle cues: standard readers parse them, cues keep the rules and the text."""

from __future__ import annotations

import json

import pytest
import srt
import webvtt
from hypothesis import given, settings
from hypothesis import strategies as st

from qasr.errors import UsageError
from qasr.runtime.formats import MIN_CUE_MS, render, subtitle_segments, to_json, to_srt, to_txt, to_vtt
from qasr.runtime.results import Segment, Transcript, Word
from qasr.runtime.timestamps import split_units

ENGLISH = "Hello, world! It's the U.S. economy: 3.14 percent growth, well-known since 2026. Really?"
CHINESE = "今天我们发布了语音识别模型，支持三十种语言。交易停滞！市场观望？"
MIXED = "我们用Qwen3-ASR识别English和中文，准确率99.5%。Great, isn't it?"


def timed(text: str, language: str = "English", step: float = 0.3, length: float = 0.25) -> list[Word]:
    """Evenly timed words for the aligner units of `text`."""
    return [Word(u, round(i * step, 3), round(i * step + length, 3)) for i, u in enumerate(split_units(text, language))]


def seconds(clock: str) -> float:
    hours, minutes, rest = clock.split(":")
    return round(int(hours) * 3600 + int(minutes) * 60 + float(rest), 3)


def check_cues(segments: list[Segment], words: list[Word]) -> None:
    """Ordered, non-overlapping, positive length, one line of text each."""
    previous_end = 0.0
    for s in segments:
        assert previous_end <= s.start < s.end
        assert s.text and s.text == s.text.strip() and "\n" not in s.text
        previous_end = s.end
    assert segments[0].start == words[0].start


def test_txt_and_json():
    t = Transcript(text="你好，world", language="Chinese,English", token_ids=[1, 2, 3], audio="a.wav", duration=1.5,
                   timings={"encode": 0.25}, truncated=True)
    assert to_txt(t) == "你好，world\n"
    out = to_json(t)
    assert "你好，world" in out  # UTF-8, not \\u escapes
    assert json.loads(out) == {"audio": "a.wav", "language": "Chinese,English", "text": "你好，world",
                               "token_ids": [1, 2, 3], "duration": 1.5, "timings": {"encode": 0.25},
                               "truncated": True}
    t.words = [Word("你", 0.0, 0.1), Word("好", 0.1, 0.24)]
    assert json.loads(to_json(t))["words"] == [{"text": "你", "start": 0.0, "end": 0.1},
                                               {"text": "好", "start": 0.1, "end": 0.24}]
    assert render(t, "json") == to_json(t) and render(t, "txt") == to_txt(t)


@pytest.mark.parametrize("text,language", [(ENGLISH, "English"), (CHINESE, "Chinese"), (MIXED, "Chinese")])
def test_subtitles_parse_and_keep_the_text(text, language):
    words = timed(text, language)
    segments = subtitle_segments(text, words, max_chars=24, max_duration=3.0)
    check_cues(segments, words)
    for s in segments:
        assert len(s.text) <= 24 and s.end - s.start <= 3.0
    # Every character of the transcript is shown once, punctuation included.
    assert "".join(s.text for s in segments).replace(" ", "") == text.replace(" ", "")

    parsed = list(srt.parse(to_srt(segments)))
    assert [(p.index, p.content) for p in parsed] == [(n, s.text) for n, s in enumerate(segments, 1)]
    assert [p.start.total_seconds() for p in parsed] == [s.start for s in segments]
    assert [p.end.total_seconds() for p in parsed] == [s.end for s in segments]

    cues = list(webvtt.from_string(to_vtt(segments)))
    assert [c.text for c in cues] == [s.text for s in segments]
    assert [(seconds(c.start), seconds(c.end)) for c in cues] == [(s.start, s.end) for s in segments]


def test_cues_break_at_sentences():
    segments = subtitle_segments(ENGLISH, timed(ENGLISH))
    assert [s.text for s in segments] == [
        "Hello, world!", "It's the U.S. economy: 3.14 percent", "growth, well-known since 2026.", "Really?"]
    chinese = subtitle_segments(CHINESE, timed(CHINESE, "Chinese"))
    assert [s.text for s in chinese] == ["今天我们发布了语音识别模型，支持三十种语言。", "交易停滞！", "市场观望？"]


def test_clock_format():
    segments = [Segment(0.0, 1.5, "a"), Segment(3599.999, 3723.004, "b"), Segment(360000.0, 360001.0, "c")]
    assert to_srt(segments) == ("1\n00:00:00,000 --> 00:00:01,500\na\n\n"
                                "2\n00:59:59,999 --> 01:02:03,004\nb\n\n"
                                "3\n100:00:00,000 --> 100:00:01,000\nc\n\n")
    assert to_vtt(segments[:2]) == "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\na\n\n00:59:59.999 --> 01:02:03.004\nb\n\n"


def test_long_word_gets_its_own_cue():
    text = "a " + "x" * 60 + " b, c."
    words = [Word("a", 0, 0.5), Word("x" * 60, 0.5, 9.0), Word("b", 9.0, 9.2), Word("c", 9.2, 9.4)]
    assert [s.text for s in subtitle_segments(text, words)] == ["a", "x" * 60, "b, c."]


def test_duration_limit_splits_cues():
    text = "one two three four"
    words = [Word(w, i * 2.0, i * 2.0 + 1.5) for i, w in enumerate(text.split())]
    assert [s.text for s in subtitle_segments(text, words, max_duration=4.0)] == ["one two", "three four"]


def test_zero_length_words():
    text = "Yes. No. Maybe."
    zero = [Word(w, 0.0, 0.0) for w in ["Yes", "No", "Maybe"]]
    segments = subtitle_segments(text, zero)
    assert [(s.start, s.end) for s in segments] == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5)]
    # A zero-length cue ends at the next cue's start when that comes sooner than MIN_CUE_MS.
    words = [Word("Yes", 1.0, 1.0), Word("No", 1.2, 1.6), Word("Maybe", 1.6, 1.6)]
    assert [(s.start, s.end) for s in subtitle_segments(text, words)] == [(1.0, 1.2), (1.2, 1.6), (1.6, 2.1)]
    assert MIN_CUE_MS == 500


def test_empty_and_bad_inputs():
    assert subtitle_segments("", []) == []
    assert subtitle_segments("Only text.", []) == []
    assert to_srt([]) == "" and to_vtt([]) == "WEBVTT\n\n"
    assert list(webvtt.from_string(to_vtt([]))) == []
    # Words that are not in the text still get cues, with their own text.
    assert [s.text for s in subtitle_segments("", [Word("ghost", 0, 1)])] == ["ghost"]
    t = Transcript(text="hi", language="English", token_ids=[])
    with pytest.raises(UsageError, match="need word timestamps"):
        render(t, "srt")
    with pytest.raises(UsageError, match="unknown output format 'docx'"):
        render(t, "docx")
    with pytest.raises(UsageError, match="must be positive"):
        subtitle_segments("hi", [Word("hi", 0, 1)], max_chars=0)


def test_render_subtitles():
    t = Transcript(text=MIXED, language="Chinese", token_ids=[], words=timed(MIXED, "Chinese"))
    assert render(t, "srt") == to_srt(subtitle_segments(MIXED, t.words))
    assert render(t, "vtt") == to_vtt(subtitle_segments(MIXED, t.words))


def test_cue_text_cannot_break_the_file():
    text = "a -->\n\nb"
    segments = subtitle_segments(text, [Word("a", 0, 1), Word("b", 1, 2)])
    assert [s.text for s in segments] == ["a -> b"]
    assert [p.content for p in srt.parse(to_srt(segments))] == ["a -> b"]


_PIECES = st.sampled_from(["Hello", "world", "it's", "U.S.", "3.14", "中", "文", "。", ",", "!", "?", " ", " ",
                           "\n", "well-known", "x" * 50, "、", "Ｑｗｅｎ"])


@settings(max_examples=150, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=40), st.data(), st.integers(5, 60), st.floats(0.5, 10))
def test_cue_rules_property(pieces, data, max_chars, max_duration):
    text = "".join(pieces)
    units = split_units(text, "Chinese")
    if not units:
        assert subtitle_segments(text, []) == []
        return
    gaps = data.draw(st.lists(st.sampled_from([0, 0, 40, 80, 400, 7000]), min_size=2 * len(units),
                              max_size=2 * len(units)))
    ms, times = 0, []
    for gap in gaps:  # non-decreasing, as the aligner's repaired times are
        ms += gap
        times.append(ms / 1000)
    words = [Word(u, times[2 * i], times[2 * i + 1]) for i, u in enumerate(units)]
    segments = subtitle_segments(text, words, max_chars, max_duration)
    check_cues(segments, words)
    assert "".join(s.text for s in segments).replace(" ", "") == "".join(text.split())
    for s in segments:
        cue_units = split_units(s.text, "Chinese")
        if len(cue_units) > 1:
            assert len(s.text) <= max_chars
            assert s.end - s.start <= max(max_duration, MIN_CUE_MS / 1000) + 1e-9
    assert list(srt.parse(to_srt(segments)))
    assert len(list(webvtt.from_string(to_vtt(segments)))) == len(segments)


def test_one_registry_serves_the_cli_and_the_server():
    """The CLI's --format choices and the server's response formats come from FORMATS."""
    from qasr.cli import build_parser
    from qasr.runtime.formats import FORMATS
    from qasr.serve.openai_api import PLAIN, RESPONSE_FORMATS

    for name in FORMATS:
        assert build_parser().parse_args(["transcribe", "a.wav", "--format", name]).format == name
    assert set(RESPONSE_FORMATS) == {"json", "verbose_json", "text", "srt", "vtt"}
    assert {f.name for f in PLAIN.values()} == {"txt", "srt", "vtt"}
    t = Transcript("Hi.", "English", [1], words=[Word("Hi", 0.0, 0.4)])
    for fmt in PLAIN.values():
        assert render(t, fmt.name) == fmt.write(t) and fmt.media_type.startswith(("text/", "application/"))
