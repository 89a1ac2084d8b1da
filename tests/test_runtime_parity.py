"""Parity tier 3: the whole runtime (numpy frontend, ONNX Runtime, greedy loop, parser) against the
official `Qwen3ASRModel.transcribe` on real speech: identical token ids and text.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from oracle import clip_features, official_transcribe, relative_error, windowed_encoder
from support import DATA

BUDGET = 20


@pytest.fixture(scope="module")
def models(model_pair):
    def get(preset="tiny-untied"):
        official, ours = model_pair(preset, BUDGET)
        official.max_inference_batch_size = 1  # chunk by chunk, as the runtime decodes them
        return official, ours

    return get


@pytest.fixture(scope="module")
def long_files(tmp_path_factory, speech):
    """12 s and 65 s recordings, written as files so both sides load them from disk."""
    folder = tmp_path_factory.mktemp("long")
    paths = {}
    for seconds in (12.0, 65.0):
        paths[seconds] = folder / f"speech_{int(seconds)}s.wav"
        sf.write(paths[seconds], speech(seconds, start=1), 16000, subtype="PCM_16")
    return paths


CASES = [  # (file or seconds, language, context)
    ("en_16k_s16.wav", None, ""),
    ("de_22k.flac", "German", ""),
    ("zh_16k_f32_loud.wav", None, "交易 停滞"),
    ("fr_48k.ogg", "French", "Bonjour"),
    ("es_16k_4ch.wav", None, ""),
    (12.0, None, "McDonald's iPhone"),
    (12.0, "English", ""),
    (65.0, None, ""),
    (65.0, "Chinese", "会议记录"),
]


@pytest.mark.parametrize("preset", ["tiny-untied", "tiny"])
@pytest.mark.parametrize("source,language,context", CASES)
def test_transcribe_matches_official(models, long_files, preset, source, language, context):
    official, ours = models(preset)
    path = str(long_files[source] if isinstance(source, float) else DATA / source)
    expected, ids = official_transcribe(official, path, language=language, context=context)
    result = ours.transcribe(path, language=language, context=context, max_new_tokens=BUDGET)
    assert result.token_ids == ids
    assert (result.text, result.language) == (expected.text, expected.language)


def test_long_audio_is_split_like_the_official(models, long_files, monkeypatch):
    """Past the one-pass limit both sides cut at the same quiet points and join the parts."""
    import qwen_asr.inference.qwen3_asr as official_module

    import qasr.runtime.transcribe as runtime

    monkeypatch.setattr(official_module, "MAX_ASR_INPUT_SECONDS", 20)
    monkeypatch.setattr(runtime, "MAX_SECONDS", 20)
    official, ours = models("tiny-untied")
    path = str(long_files[65.0])
    expected, ids = official_transcribe(official, path)
    result = ours.transcribe(path, max_new_tokens=BUDGET)
    assert result.token_ids == ids and len(ids) > 3 * BUDGET  # four parts, each with its own budget
    assert (result.text, result.language) == (expected.text, expected.language)


def test_different_audio_gives_different_ids(models):
    _, ours = models("tiny-untied")
    runs = [ours.transcribe(str(DATA / name), max_new_tokens=8).token_ids
            for name in ("en_16k_s16.wav", "de_22k.flac", "it_8k_s32.wav")]
    assert len({tuple(r) for r in runs}) == 3


@pytest.mark.parametrize("name", ["en_16k_s16.wav", "it_8k_s32.wav", "short_44k.wav"])
def test_encode_matches_official_audio_features(models, name):
    official, ours = models("tiny-untied")
    from oracle import asr_inputs, official_encoder
    from qwen_asr.inference.utils import normalize_audio_input

    inputs = asr_inputs(official, normalize_audio_input(str(DATA / name)))
    with windowed_encoder():
        _, expected = official_encoder(official.model, clip_features(inputs))
    mine = ours.encode(str(DATA / name))
    assert mine.shape == tuple(expected.shape)
    assert relative_error(mine, expected) <= 1e-3  # the two frontends agree to 2e-4 on the features


def test_budget_cut_is_reported(models):
    _, ours = models("tiny-untied")
    result = ours.transcribe(str(DATA / "en_16k_s16.wav"), max_new_tokens=3)
    assert result.truncated and len(result.token_ids) == 3


def test_array_input_equals_file_input(models):
    _, ours = models("tiny-untied")
    wav, rate = sf.read(DATA / "de_22k.flac", dtype="float32")
    from_file = ours.transcribe(str(DATA / "de_22k.flac"), max_new_tokens=6)
    from_array = ours.transcribe((wav, rate), max_new_tokens=6)
    assert from_array.token_ids == from_file.token_ids and from_array.audio is None
    assert np.isclose(from_array.duration, from_file.duration)


@pytest.mark.parametrize("seconds", [0.4, 1.3, 5.0])
def test_explicit_budget_is_the_budget_as_in_official(models, speech, tmp_path, seconds):
    """`max_new_tokens=48` writes up to 48 tokens, as the official package does, even where the
    default budget (32 + 10/s: 36, 45 and 82 tokens here) would be smaller or larger."""
    official, ours = models("tiny-untied")
    path = tmp_path / "clip.wav"
    sf.write(path, speech(seconds, start=1), 16000, subtype="PCM_16")
    official.max_new_tokens = 48
    try:
        expected, ids = official_transcribe(official, str(path))
    finally:
        official.max_new_tokens = BUDGET
    result = ours.transcribe(str(path), max_new_tokens=48)
    assert result.token_ids == ids and (result.text, result.language) == (expected.text, expected.language)
    assert len(ids) == 48 and result.truncated  # this random model never stops early: the budget ends it
