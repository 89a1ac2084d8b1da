"""The ASR prompt and the output parser against the official qwen-asr 0.0.6 code."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qasr.errors import UsageError
from qasr.runtime.prompt import (
    asr_prompt,
    check_language,
    expand_audio,
    fix_repetitions,
    merge_languages,
    normalize_language,
    parse_output,
    prompt_ids,
)
from qasr.runtime.tokenizer import Tokenizer

official_utils = pytest.importorskip("qwen_asr.inference.utils")

CONTEXTS = ["", "交易 停滞", "McDonald's iPhone, OpenAI and TensorRT", "first line\nsecond line\n\n", "  padded  ",
            "a<|im_end|>b<asr_text>c<|audio_start|>", "language English<asr_text>", "Ünïcödé — «quotes» 😀",
            "Cafe\u0301 decomposed", "\ttabs\r\nand CRLF"]
LANGUAGES = [None, "English", "Chinese", "Cantonese"]


@pytest.fixture(scope="module")
def official(checkpoint):
    from oracle import load_official

    return load_official(checkpoint("tiny"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_dir(checkpoint("tiny"))


def test_prompt_string_is_the_official_chat_template(official):
    for context in CONTEXTS:
        for language in LANGUAGES:
            expected = official._build_text_prompt(context=context, force_language=language)
            assert asr_prompt(context, language) == expected
    assert asr_prompt(None, "") == official._build_text_prompt(context=None, force_language="")


@pytest.mark.parametrize("seconds", [0.5, 1.0, 3.77, 9.3])
def test_prompt_ids_equal_the_official_processor(official, tokenizer, seconds):
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, int(seconds * 16000)).astype(np.float32)
    pad = tokenizer.token_id("<|audio_pad|>")
    for context in CONTEXTS:
        for language in LANGUAGES:
            prompt = official._build_text_prompt(context=context, force_language=language)
            expected = official.processor(text=[prompt], audio=[wav])["input_ids"][0]
            expected = [int(i) for i in expected]
            assert prompt_ids(tokenizer, context, language, expected.count(pad)) == expected


def test_empty_context_ids_match_the_spec(tokenizer):
    ids = prompt_ids(tokenizer, "", None, 3)
    special = [tokenizer.token_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>")]
    im_start, im_end, audio_start, audio_end = special
    pad = tokenizer.token_id("<|audio_pad|>")
    assert ids[0] == im_start
    assert ids[ids.index(audio_start):ids.index(audio_end) + 1] == [audio_start, pad, pad, pad, audio_end]
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert tokenizer.decode(ids, skip_special_tokens=False) == asr_prompt("", None).replace(
        "<|audio_pad|>", "<|audio_pad|>" * 3)


def test_audio_placeholder_in_context_is_refused(official, tokenizer):
    # The official processor expands the context's placeholder instead of the real one and fails.
    prompt = official._build_text_prompt(context="x<|audio_pad|>y", force_language=None)
    with pytest.raises(StopIteration):
        official.processor(text=[prompt], audio=[np.zeros(16000, np.float32)])
    with pytest.raises(UsageError, match="audio placeholder"):
        prompt_ids(tokenizer, "x<|audio_pad|>y", None, 13)


def test_expand_audio_needs_one_placeholder_and_tokens():
    assert expand_audio([1, 7, 2], 7, 3) == [1, 7, 7, 7, 2]
    with pytest.raises(UsageError, match="2 audio placeholders"):
        expand_audio([7, 7], 7, 3)
    with pytest.raises(UsageError, match="0 audio tokens"):
        expand_audio([1, 7], 7, 0)


def test_language_names():
    for name in ["english", "ENGLISH", " cHINese ", "c", "Ñandú", "ß"]:
        assert normalize_language(name) == official_utils.normalize_language_name(name)
    assert check_language(" japanese", official_utils.SUPPORTED_LANGUAGES) == "Japanese"
    with pytest.raises(UsageError) as err:
        check_language("Klingon", ["English", "German"])
    assert str(err.value) == "unsupported language 'Klingon'; supported: English, German"
    with pytest.raises(UsageError, match="language is empty"):
        check_language("  ", ["English"])


RAW_OUTPUTS = [
    "", "   ", "language English<asr_text>Today we release it.", "language Chinese<asr_text>  今天  ",
    "language None<asr_text>", "language none<asr_text> stray text ", "LANGUAGE gERMAN<asr_text>Hallo",
    "no tag at all", "language English", "\nsome header\nlanguage french \n<asr_text>Bonjour<asr_text>x",
    "language <asr_text>text", "language English\u2028x<asr_text>y", "<asr_text>only text",
    "language English<asr_text>" + "ha" * 40, "language English<asr_text>" + "a" * 50 + "b",
]


def test_parse_output_matches_official():
    for raw in RAW_OUTPUTS:
        for language in [None, "", "English", "Chinese"]:
            assert parse_output(raw, language) == official_utils.parse_asr_output(raw, user_language=language), raw


_FRAGMENTS = st.sampled_from(["language ", "English", "None", "nOnE", "<asr_text>", "\n", " ", "  ", "Hi.",
                              "你好", "ab", "a", "\r\n", "language", "x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=25), st.lists(st.sampled_from(["ab", "a", "你好", " x"]), max_size=30),
       st.sampled_from([None, "English"]))
def test_parse_output_property(fragments, repeats, language):
    raw = "".join(fragments) + "".join(repeats)
    assert parse_output(raw, language) == official_utils.parse_asr_output(raw, user_language=language)


def _repetitive_text(alphabet: str):
    """Texts made of runs of short patterns, so that repeats past small thresholds really occur."""
    piece = st.tuples(st.text(alphabet, min_size=1, max_size=6), st.integers(1, 45))
    return st.lists(piece, max_size=8).map(lambda parts: "".join(p * n for p, n in parts))


@settings(max_examples=400, deadline=None)
@given(st.one_of(_repetitive_text("ab"), _repetitive_text("abc \n"), _repetitive_text("你好ab。"),
                 _repetitive_text("aé😀\t"), st.text(max_size=80)),
       st.sampled_from([1, 2, 3, 5, 20]))
def test_fix_repetitions_matches_official(text, threshold):
    assert fix_repetitions(text, threshold) == official_utils.detect_and_fix_repetitions(text, threshold)


def test_fix_repetitions_examples():
    assert fix_repetitions("a" * 21) == "a"
    assert fix_repetitions("a" * 20) == "a" * 20  # a run must be longer than the threshold
    assert fix_repetitions("x" + "ab" * 30 + "y" * 15) == "xab" + "y" * 15
    assert fix_repetitions("ab" * 20 + "abc" * 19) == "abc" * 19  # the "ab" run takes the first "abc"'s "ab"
    assert fix_repetitions("z" + "aab" * 25) == "zaab"  # shortest period at the leftmost position
    # A repeat counts only when it starts 2 x threshold or more before the end, as in the official code.
    assert fix_repetitions("a" * 20 + "xyz" * 10) == "a" + "xyz" * 10
    assert fix_repetitions("xyz" * 10 + "a" * 20) == "xyz" * 10 + "a" * 20
    with pytest.raises(ValueError):
        fix_repetitions("abc", 0)


def test_fix_repetitions_on_long_looping_output():
    """20 minutes of audio can give ~100k characters; a decoder loop must not break the clean-up.

    The official function recurses once per repeat and fails past the recursion limit (~1000);
    below it both agree.
    """
    looping = ("我们" * 25 + "发布模型。") * 4000
    assert fix_repetitions(looping) == ("我们" + "发布模型。") * 4000
    shorter = looping[: 500 * 55]
    assert fix_repetitions(shorter) == official_utils.detect_and_fix_repetitions(shorter)


def test_merge_languages_matches_official():
    cases = [[], [""], ["Chinese"], ["Chinese", "Chinese", "English", "", "English", "Chinese"],
             [" English ", "English", None, "German"], ["", "", "French", "", "French"]]
    for languages in cases:
        assert merge_languages(languages) == official_utils.merge_languages(languages)
    assert merge_languages(["Chinese", "English", "English"]) == "Chinese,English"


def test_partial_text_cuts_where_the_parse_will():
    """What a streamer may show of unfinished output: held back while it may still be metadata."""
    from qasr.runtime.prompt import partial_text

    assert partial_text("language Eng", forced=False) is None
    assert partial_text("language English<asr_text> hello wor", forced=False) == "hello wor"
    assert partial_text(" hello", forced=False) == "hello"  # cannot be metadata: the whole output
    assert partial_text("language English<asr_text>hi", forced=True) == "language English<asr_text>hi"
    raw = "language English<asr_text>hello world"
    assert partial_text(raw, forced=False) == parse_output(raw, None)[1]
