"""Aligner units, input and timestamp repair against the official Qwen3ForceAlignProcessor."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qasr.errors import UsageError
from qasr.runtime import timestamps
from qasr.runtime.results import Word
from qasr.runtime.timestamps import aligner_ids, aligner_text, repair_timestamps, split_units, unit_spans, unit_times
from qasr.runtime.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
official_aligner = pytest.importorskip("qwen_asr.inference.qwen3_forced_aligner")

TEXTS = {
    "English": "Well, it's the U.S. economy's well-known 3.14% growth -- isn't it?  Yes!\n(Really.)",
    "Chinese": "今天我们发布了语音识别模型，支持三十种语言。2026年！",
    "Cantonese": "我哋今日發佈語音識別模型。",
    "mixed": "我们用Qwen3-ASR识别English和中文，准确率99.5%。𠀀𪜀丽",
    "German": "Heute veröffentlichen wir ein Spracherkennungsmodell – für 30 Sprachen, z.B. Deutsch.",
    "French": "Aujourd'hui, nous publions « un modèle » de reconnaissance vocale : c'est l'été !",
    "Russian": "Сегодня мы выпускаем модель распознавания речи, версия 2.0.",
    "Japanese": "今日は音声認識モデルを公開します。ＱｗｅｎとASR、ｶﾀｶﾅも１２３個！",
    "Korean": "오늘 우리는 음성 인식 모델을 공개합니다. 감사합니다! Qwen3-ASR 2026년",
}


@pytest.fixture(scope="module")
def processor():
    return official_aligner.Qwen3ForceAlignProcessor()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_units_and_input_match_official(processor, name):
    language = "English" if name == "mixed" else name
    for spelled in (language, language.upper(), language.lower()):
        units = split_units(TEXTS[name], spelled)
        words, input_text = processor.encode_timestamp(TEXTS[name], spelled)
        assert units == words
        assert aligner_text(units) == input_text
    assert units, name


def test_units_examples():
    assert split_units("U.S. well-known it's 3.14 2026年", "English") == ["US", "wellknown", "it's", "314", "2026", "年"]
    assert split_units("ab中c文d", "Chinese") == ["ab", "中", "c", "文", "d"]
    assert split_units("... -- !", "English") == []
    assert aligner_text([]) == "<|audio_start|><|audio_pad|><|audio_end|><timestamp><timestamp>"
    assert aligner_text(["a", "b"]) == (
        "<|audio_start|><|audio_pad|><|audio_end|>a<timestamp><timestamp>b<timestamp><timestamp>")


_MIXED = st.text(st.sampled_from(list("aZé'’-.,!? \n\t0９中文𠀀한글カナ。，ー_") + ["\u0301", "\u3000"]), max_size=60)


@settings(max_examples=200, deadline=None)
@given(_MIXED, st.sampled_from(["English", "Chinese", "french", "", "Unknown"]))
def test_units_property(processor, text, language):
    assert split_units(text, language) == processor.encode_timestamp(text, language)[0]


@settings(max_examples=40, deadline=None)
@given(_MIXED)
def test_units_property_japanese_korean(processor, text):
    for language in ("Japanese", "Korean"):
        assert split_units(text, language) == processor.encode_timestamp(text, language)[0]


def test_missing_word_splitters_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nagisa", None)
    with pytest.raises(UsageError, match=r'pip install "qwen3-asr-edge\[ja\]"'):
        split_units("今日は", "Japanese")
    monkeypatch.setitem(sys.modules, "soynlp.tokenizer", None)
    timestamps._korean_tokenizer.cache_clear()
    try:
        with pytest.raises(UsageError, match=r'pip install "qwen3-asr-edge\[ko\]"'):
            split_units("오늘", "Korean")
    finally:
        timestamps._korean_tokenizer.cache_clear()


def test_aligner_ids_equal_the_official_processor(checkpoint):
    from oracle import load_official_aligner

    path = checkpoint("tiny-aligner")
    official = load_official_aligner(path)
    tokenizer = Tokenizer.from_dir(path)
    wav = np.random.default_rng(1).uniform(-0.5, 0.5, 3 * 16000 + 123).astype(np.float32)
    pad, slot = tokenizer.token_id("<|audio_pad|>"), tokenizer.token_id("<timestamp>")
    for name in ("English", "mixed", "Japanese", "Korean"):
        units, input_text = official.aligner_processor.encode_timestamp(TEXTS[name], name)
        expected = [int(i) for i in official.processor(text=[input_text], audio=[wav])["input_ids"][0]]
        ids = aligner_ids(tokenizer, split_units(TEXTS[name], name), expected.count(pad))
        assert ids == expected
        assert ids.count(slot) == 2 * len(units)


# --- timestamp repair ---------------------------------------------------------------------------

def _official_fix(processor, values):
    return processor.fix_timestamp(np.asarray(values, dtype=np.float32))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=60))
def test_repair_matches_official_on_class_sequences(processor, classes):
    values = [c * 80.0 for c in classes]
    assert repair_timestamps(values) == _official_fix(processor, values)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0, 5000, width=32), min_size=1, max_size=40))
def test_repair_matches_official_on_any_floats(processor, values):
    assert repair_timestamps(values) == _official_fix(processor, values)


def test_repair_examples():
    assert repair_timestamps([]) == []
    assert repair_timestamps([0, 80, 160, 240]) == [0, 80, 160, 240]
    # One spike: the nearer kept neighbour, the left one on a tie.
    assert repair_timestamps([0, 80, 900, 160, 240]) == [0, 80, 80, 160, 240]
    # Two anomalies: the first takes the left neighbour, the second the right one.
    assert repair_timestamps([0, 80, 900, 950, 160, 240, 320]) == [0, 80, 80, 160, 160, 240, 320]
    # Three or more: linear interpolation between the neighbours, truncated to int.
    assert repair_timestamps([0, 100, 900, 950, 960, 201, 300, 400, 500]) == [0, 100, 125, 150, 175, 201, 300,
                                                                                400, 500]
    # At the ends a run copies its one neighbour.
    assert repair_timestamps([500, 600, 700, 0, 80, 160, 240]) == [0, 0, 0, 0, 80, 160, 240]
    assert repair_timestamps([0, 80, 160, 240, 10, 20]) == [0, 80, 160, 240, 240, 240]
    # Ties between equally long subsequences: the earliest one ending first is kept.
    assert repair_timestamps([5, 1, 6, 2]) == [5, 5, 6, 6]


def test_repair_matches_official_on_long_sequences(processor):
    rng = np.random.default_rng(0)
    classes = np.sort(rng.integers(0, 2250, 5000)) + rng.integers(-40, 40, 5000) * (rng.random(5000) < 0.1)
    values = (np.clip(classes, 0, 4999) * 80.0).tolist()
    assert repair_timestamps(values) == _official_fix(processor, values)


# --- unit times ---------------------------------------------------------------------------------

def _official_words(processor, units, class_ids, offset):
    """The official align() post-processing and transcribe()'s chunk offset, on given class ids."""
    from qwen_asr.inference.qwen3_asr import Qwen3ASRModel

    ms = (torch.tensor(class_ids) * 80.0).numpy()
    items = processor.parse_timestamp(units, ms)
    for it in items:
        it["start_time"] = round(it["start_time"] / 1000.0, 3)
        it["end_time"] = round(it["end_time"] / 1000.0, 3)
    result = official_aligner.ForcedAlignResult(items=[official_aligner.ForcedAlignItem(
        text=it["text"], start_time=float(it["start_time"]), end_time=float(it["end_time"])) for it in items])
    shifted = Qwen3ASRModel._offset_align_result(None, result, offset)
    return [Word(it.text, it.start_time, it.end_time) for it in shifted.items]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4999), min_size=2, max_size=40).filter(lambda c: len(c) % 2 == 0),
       st.sampled_from([0.0, 180.0, 359.987, 1234.5678]))
def test_unit_times_match_official(processor, class_ids, offset):
    units = [f"w{i}" for i in range(len(class_ids) // 2)]
    assert unit_times(units, class_ids, 80.0, offset) == _official_words(processor, units, class_ids, offset)


def test_unit_times_examples():
    words = unit_times(["今", "天"], [1, 3, 3, 2], 80.0, offset=1.5)
    assert words == [Word("今", 1.58, 1.74), Word("天", 1.74, 1.74)]
    assert unit_times([], [0, 0], 80.0) == []
    with pytest.raises(UsageError, match="3 timestamp slots for 2 units"):
        unit_times(["a", "b"], [1, 2, 3], 80.0)


# --- units back onto the text -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEXTS))
def test_unit_spans_cover_each_unit(name):
    text = TEXTS[name]
    language = "English" if name == "mixed" else name
    units = split_units(text, language)
    spans = unit_spans(text, units)
    assert len(spans) == len(units)
    previous_end = 0
    for unit, (start, end) in zip(units, spans):
        assert previous_end <= start < end
        assert timestamps._comparable(text[start:end])[0] == timestamps._comparable(unit)[0]
        previous_end = end


@settings(max_examples=60, deadline=None)
@given(_MIXED)
def test_unit_spans_property(text):
    for language in ("English", "Japanese", "Korean"):
        units = split_units(text, language)
        spans = unit_spans(text, units)
        assert all(start < end for start, end in spans)
        assert [timestamps._comparable(text[a:b])[0] for a, b in spans] == [timestamps._comparable(u)[0] for u in units]


def test_unit_spans_examples():
    text = "U.S. well-known, ok"
    assert [text[a:b] for a, b in unit_spans(text, ["US", "wellknown", "ok"])] == ["U.S", "well-known", "ok"]
    # nagisa writes full-width letters half-width; the span is still the original characters.
    assert unit_spans("ＱｗｅｎとASR", ["Qwen", "と", "ASR"]) == [(0, 4), (4, 5), (5, 8)]
    assert unit_spans("ｶﾞス", ["ガス"]) == [(0, 3)]  # nagisa composes half-width kana
    # A unit not in the text gets an empty span where the previous one ended.
    assert unit_spans("one two", ["one", "zzz", "two"]) == [(0, 3), (3, 3), (4, 7)]
