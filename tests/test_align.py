"""The forced aligner: graph parity, the pipeline against the official aligner, subtitles, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import srt
import torch
import webvtt

from oracle import (
    clip_features,
    load_official,
    load_official_aligner,
    official_transcribe,
    relative_error,
    windowed_encoder,
)
from qasr.cli import main
from qasr.errors import BundleError, UsageError
from qasr.models.thinker import Thinker
from qasr.runtime.align import Aligner
from qasr.runtime.audio import load_audio
from qasr.runtime.embed import embed_audio
from qasr.runtime.timestamps import aligner_ids
from qasr.runtime.transcribe import Transcriber
from support import DATA

EN = DATA / "en_16k_s16.wav"
TEXTS = [  # (audio, text, language)
    ("en_16k_s16.wav", "The quick brown fox jumps over the lazy dog.", "English"),
    ("zh_16k_f32_loud.wav", "今天天气很好。", "Chinese"),
    ("zh_16k_f32_loud.wav", "今天用 TensorRT 跑 Qwen3-ASR，速度快了3.5倍！", "Chinese"),
    ("de_22k.flac", "Guten Morgen, wie geht's Ihnen? Es ist 8:30 Uhr.", "German"),
    ("en_16k_s16.wav", "It's the U.S. well-known 2026 e-mail, isn't it?", "English"),
]


@pytest.fixture(scope="module")
def aligners(checkpoint, bundle):
    path = checkpoint("tiny-aligner")
    return load_official_aligner(path), Aligner.load(bundle("tiny-aligner"), backend="onnxruntime"), path


def _official_align(official, audio: str, text: str, language: str):
    """The official aligner's words and the class ids it read at the timestamp slots."""
    from qwen_asr.inference.utils import normalize_audio_input

    words, prompt = official.aligner_processor.encode_timestamp(text, language)
    inputs = official.processor(text=[prompt], audio=[normalize_audio_input(audio)], return_tensors="pt",
                                padding=True)
    with windowed_encoder(), torch.no_grad():
        logits = official.model.thinker(**inputs).logits[0]
        result = official.align(audio=audio, text=text, language=language)[0]
    slots = inputs["input_ids"][0] == official.timestamp_token_id
    return result, logits[slots].argmax(-1).tolist(), inputs


@pytest.mark.parametrize("audio,text,language", TEXTS)
def test_align_matches_official(aligners, audio, text, language):
    official, ours, _ = aligners
    expected, classes, _ = _official_align(official, str(DATA / audio), text, language)
    words = ours.align(str(DATA / audio), text, language)
    assert [w.text for w in words] == [item.text for item in expected]
    assert [(w.start, w.end) for w in words] == [(item.start_time, item.end_time) for item in expected]
    embeds = embed_audio(ours.backend, load_audio(str(DATA / audio)), ours.window_frames)
    ids = np.asarray([aligner_ids(ours.tokenizer, [w.text for w in words], len(embeds))])
    assert ours.backend.align(ids, embeds[None])[0].tolist() == classes


def test_aligner_graph_matches_reference(aligners):
    official, ours, path = aligners
    reference = Thinker.from_pretrained(path)
    _, classes, inputs = _official_align(official, str(EN), "Hello world, it's 2026.", "English")
    embeds = reference.encode(clip_features(inputs))
    with torch.no_grad():
        expected_classes, expected_logits = reference.aligner()(inputs["input_ids"], embeds[None])
    got_classes, got_logits = ours.backend.align(inputs["input_ids"].numpy(), embeds[None].numpy())
    assert relative_error(got_logits, expected_logits) <= 1e-4
    assert got_classes.tolist() == expected_classes.tolist() == classes


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory, speech):
    path = tmp_path_factory.mktemp("align") / "talk_50s.wav"
    sf.write(path, speech(50.0, start=1), 16000, subtype="PCM_16")
    return str(path)


@pytest.mark.parametrize("seconds_limit", [180, 20])
def test_transcribe_with_timestamps_matches_official(aligners, checkpoint, bundle, long_clip, monkeypatch,
                                                     seconds_limit):
    """ASR then alignment per part; past the part limit both sides split at the same quiet points."""
    import qwen_asr.inference.qwen3_asr as official_module

    import qasr.runtime.transcribe as runtime

    monkeypatch.setattr(official_module, "MAX_FORCE_ALIGN_INPUT_SECONDS", seconds_limit)
    monkeypatch.setattr(runtime, "ALIGN_SECONDS", seconds_limit)
    official_aligner, aligner, _ = aligners
    official = load_official(checkpoint("tiny-untied"), max_new_tokens=24)
    official.max_inference_batch_size = 1
    official.forced_aligner = official_aligner
    expected, ids = official_transcribe(official, long_clip, return_time_stamps=True)
    ours = Transcriber.load(bundle("tiny-untied"), backend="onnxruntime")
    result = ours.transcribe(long_clip, aligner=aligner, max_new_tokens=24)
    assert result.token_ids == ids and result.text == expected.text
    expected_words = [(i.text, i.start_time, i.end_time) for i in expected.time_stamps]
    assert [(w.text, w.start, w.end) for w in result.words] == expected_words
    assert len(expected_words) > 10
    if seconds_limit == 20:
        assert max(w.end for w in result.words) > 20  # times of later parts carry their offset


def test_empty_or_unsupported_text_is_refused(aligners):
    _, ours, _ = aligners
    with pytest.raises(UsageError, match="nothing to align"):
        ours.align(str(EN), "?! ...", "English")
    with pytest.raises(UsageError, match="unsupported language 'Thai'"):
        ours.align(str(EN), "สวัสดี", "Thai")


def test_audio_past_the_limit_is_refused(aligners, tmp_path):
    _, ours, _ = aligners
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(16000 * 181, dtype=np.float32), 16000)
    with pytest.raises(UsageError, match="at most 180 s"):
        ours.align(str(path), "hello", "English")


def test_bundle_kinds_are_checked(bundle):
    with pytest.raises(BundleError, match="not a forced aligner"):
        Aligner.load(bundle("tiny"))
    with pytest.raises(BundleError, match="not a speech recognition model"):
        Transcriber.load(bundle("tiny-aligner"))


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_align_json_srt_vtt(capsys, bundle, tmp_path):
    text_file = tmp_path / "fox.txt"
    text_file.write_text("The quick brown fox. It jumps over the lazy dog!", encoding="utf-8")
    code, out, _ = _cli(capsys, "align", EN, text_file, "--aligner", bundle("tiny-aligner"))
    result = json.loads(out)
    assert code == 0 and [w["text"] for w in result["words"]][:3] == ["The", "quick", "brown"]
    code, out, _ = _cli(capsys, "align", EN, text_file, "--aligner", bundle("tiny-aligner"), "--format", "srt")
    cues = list(srt.parse(out))
    assert code == 0 and cues and "".join(c.content for c in cues).count("!") == 1
    code, out, _ = _cli(capsys, "align", EN, "今天天气很好。", "--aligner", bundle("tiny-aligner"), "--format", "vtt")
    vtt = tmp_path / "out.vtt"
    vtt.write_text(out, encoding="utf-8")
    assert code == 0 and "".join(c.text for c in webvtt.read(str(vtt))) == "今天天气很好。"


def test_cli_transcribe_subtitles(capsys, bundle):
    code, out, _ = _cli(capsys, "transcribe", EN, "--model", bundle("tiny-untied"), "--aligner",
                        bundle("tiny-aligner"), "--format", "srt", "--max-new-tokens", 24)
    cues = list(srt.parse(out))
    assert code == 0 and cues
    assert all(c.start < c.end for c in cues) and all(a.end <= b.start for a, b in zip(cues, cues[1:]))
    code, out, _ = _cli(capsys, "transcribe", EN, "--model", bundle("tiny-untied"), "--aligner",
                        bundle("tiny-aligner"), "--timestamps", "--format", "json", "--max-new-tokens", 24)
    assert code == 0 and json.loads(out)["words"]


def test_cli_subtitles_without_aligner_use_the_default_aligner(bundle, checkpoint, tmp_path, hub_cache):
    """srt/vtt and --timestamps need word times: without --aligner, the default aligner id is
    resolved like any model (here from an offline hub cache, once missing, once holding it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    argv = [sys.executable, "-m", "qasr", "transcribe", EN, "--model", str(bundle("tiny-untied")),
            "--max-new-tokens", "24"]
    missing = subprocess.run([*argv, "--format", "vtt"], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("qasr: error: Qwen/Qwen3-ForcedAligner-0.6B: not found in the Hugging Face hub")
    hub_cache(tmp_path / "hub", "Qwen/Qwen3-ForcedAligner-0.6B", checkpoint("tiny-aligner"))
    default = subprocess.run([*argv, "--timestamps", "--format", "json"], capture_output=True, text=True, env=env)
    given = subprocess.run([*argv, "--aligner", str(bundle("tiny-aligner")), "--timestamps", "--format", "json"],
                           capture_output=True, text=True, env=env)
    assert default.returncode == given.returncode == 0, default.stderr
    assert json.loads(default.stdout)["words"] == json.loads(given.stdout)["words"]
