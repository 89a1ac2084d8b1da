"""qasr.kernels.fbank against transformers' WhisperFeatureExtractor as the official qwen-asr
processor calls it, and against a float64 evaluation of the same formula written here."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
from test_audio import DATA, FIXTURES, SPEECH, concatenated_speech, official_utils

from qasr.kernels.fbank import LogMelStream, log_mel, log_mel_batch, mel_filters
from qasr.runtime.audio import SAMPLE_RATE, load_audio

OFFICIAL_TOLERANCE = 2e-4  # the official torch path runs in float32: up to 5e-5 from float64 on speech
FLOAT64_TOLERANCE = 1e-5


@functools.lru_cache(maxsize=None)
def librosa_filters() -> np.ndarray:
    librosa = pytest.importorskip("librosa")
    return librosa.filters.mel(sr=16000, n_fft=400, n_mels=128, fmin=0.0, fmax=8000.0, htk=False,
                               norm="slaney", dtype=np.float64)


def reference_log_mel(wave: np.ndarray) -> np.ndarray:
    """Whisper's log-mel in float64, from librosa's filter bank and window (independent of qasr)."""
    librosa = pytest.importorskip("librosa")
    x = np.asarray(wave, dtype=np.float64)
    padded = np.pad(x, 200, mode="reflect")
    starts = np.arange(len(x) // 160)[:, None] * 160
    frames = padded[starts + np.arange(400)] * librosa.filters.get_window("hann", 400, fftbins=True)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    log_spec = np.log10(np.maximum(librosa_filters() @ power.T, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@functools.lru_cache(maxsize=None)
def feature_extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)


def official_features(wave: np.ndarray) -> tuple[np.ndarray, int]:
    """(features, valid frames) of one clip, the way qwen-asr's processor calls the extractor."""
    out = feature_extractor()([wave], padding=True, truncation=False, return_attention_mask=True,
                              sampling_rate=16000, return_tensors="np")
    return out["input_features"][0], int(out["attention_mask"][0].sum())


def test_mel_filters_match_librosa_and_transformers():
    transformers = pytest.importorskip("transformers")
    np.testing.assert_allclose(mel_filters(), librosa_filters(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(mel_filters(), feature_extractor().mel_filters.T, rtol=0, atol=1e-12)
    assert transformers.__version__ == "4.57.6"  # the version these filters were read from


def test_official_path_is_torch_and_gives_n_over_160_frames():
    pytest.importorskip("torch")
    from transformers.utils import is_torch_available

    assert is_torch_available()
    wave = load_audio(DATA / "en_16k_s16.wav")
    assert len(wave) % 160 != 0
    features, frames = official_features(wave)
    np.testing.assert_array_equal(features, feature_extractor()._torch_extract_fbank_features(wave[None])[0])
    assert features.shape == (128, len(wave) // 160) and frames == len(wave) // 160


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_official_features(name):
    official_wave = official_utils().normalize_audio_input(str(DATA / name))
    official, _ = official_features(official_wave)
    wave = load_audio(DATA / name)
    ours = log_mel(wave)
    assert ours.dtype == np.float32 and ours.shape == official.shape == (128, len(wave) // 160)
    assert np.abs(ours - official).max() <= OFFICIAL_TOLERANCE
    assert np.abs(ours - reference_log_mel(wave)).max() <= FLOAT64_TOLERANCE


def test_minute_long_matches_official_features():
    wave = concatenated_speech(60)
    ours = log_mel(wave)
    official, frames = official_features(wave)
    assert ours.shape == official.shape == (128, frames)
    assert np.abs(ours - official).max() <= OFFICIAL_TOLERANCE
    assert np.abs(ours - reference_log_mel(wave)).max() <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("n", [0, 1, 100, 159, 160, 161, 200, 201, 359, 360, 399, 400, 401, 799, 800, 801, 961])
def test_edge_lengths(n):
    wave = load_audio(DATA / "en_16k_s16.wav")[8000 : 8000 + n]
    ours = log_mel(wave)
    assert ours.shape == (128, n // 160)
    if n >= 160:
        assert np.abs(ours - reference_log_mel(wave)).max() <= FLOAT64_TOLERANCE


def test_silence_gives_the_floor():
    features = log_mel(np.zeros(1600, np.float32))
    assert features.shape == (128, 10) and np.ptp(features) == 0
    np.testing.assert_allclose(features, (np.log10(1e-10) + 4) / 4, atol=1e-6)


def test_rejects_multichannel():
    with pytest.raises(ValueError, match="1-D"):
        log_mel(np.zeros((2, 1600), np.float32))


def test_batch_is_identical_to_one_at_a_time():
    rng = np.random.default_rng(3)
    speech = concatenated_speech(60)
    waves = [speech[: int(n)] for n in rng.integers(0, 3 * SAMPLE_RATE, 40)] + [speech, speech[:100]]
    for ours, wave in zip(log_mel_batch(waves), waves):
        np.testing.assert_array_equal(ours, log_mel(wave))


# --- the incremental form ------------------------------------------------------------------------


def stream(wave: np.ndarray, step: int) -> np.ndarray:
    s = LogMelStream()
    parts = [s.push(wave[i : i + step]) for i in range(0, len(wave), step)]
    return np.concatenate(parts + [s.flush()], axis=1)


@pytest.mark.parametrize("step", [1, 37, 160, 1000, 10**9])
def test_stream_frames_equal_one_shot_once_the_peak_is_seen(step):
    wave = np.concatenate([np.zeros(SAMPLE_RATE // 4, np.float32), load_audio(DATA / "de_22k.flac")])
    wave = wave[:SAMPLE_RATE] if step < 160 else wave  # a sample at a time is slow
    ours, one_shot = stream(wave, step), log_mel(wave)
    assert ours.shape == one_shot.shape
    # Only frames emitted before the loudest one can differ, only where log_mel sits at its floor
    # (8 decades under the clip max), and always lower: the running max was lower then.
    differ = ours != one_shot
    loudest = int(np.argmax(one_shot.max(axis=0)))
    assert not differ[:, loudest:].any()
    assert (one_shot[differ] == one_shot.min()).all() and (ours[differ] < one_shot[differ]).all()


def test_stream_difference_after_silence_is_as_documented():
    """LogMelStream's docstring quotes these figures."""
    for name in SPEECH[:6]:
        wave = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), load_audio(DATA / name)])
        assert 0.6 < np.abs(stream(wave, 1600) - log_mel(wave)).max() <= 0.9
        loud_first = np.concatenate([wave[::-1], wave])  # its loudest frame is emitted early
        one_shot = log_mel(loud_first)
        late = np.argmax(one_shot.max(axis=0))
        np.testing.assert_array_equal(stream(loud_first, 1600)[:, late:], one_shot[:, late:])


def test_stream_holds_back_only_the_reflected_frame():
    wave = load_audio(DATA / "en_16k_s16.wav")
    whole = log_mel(wave)
    for n in [201, 239, 240, 359, 360, 1000, 1039, 1040, 16000, 23456]:
        s = LogMelStream()
        held_back = 1 if n % 160 < 40 else 0  # the last window reaches past the end: reflect-padded
        first = s.push(wave[:n])
        assert first.shape[1] == n // 160 - held_back
        assert first.shape[1] + s.push(wave[n:]).shape[1] + s.flush().shape[1] == whole.shape[1]
    # What holding back avoids: log_mel(prefix)'s reflect-padded last frame against the real one.
    diffs = [
        np.abs(log_mel(wave[:n])[:, -1] - whole[:, n // 160 - 1]).max()
        for n in range(1000, len(wave) - 1000, 997)
        if n % 160 < 40
    ]
    assert 0.2 < max(diffs) < 1.1


def test_stream_push_after_flush_is_an_error():
    s = LogMelStream()
    s.push(np.zeros(1000, np.float32))
    s.flush()
    with pytest.raises(ValueError):
        s.push(np.zeros(10, np.float32))


def test_frontend_needs_no_scipy():
    """Runtime deps are numpy, soundfile and soxr (test_isolation.py covers torch and friends)."""
    code = "import sys, qasr.runtime.audio, qasr.kernels.fbank; assert 'scipy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
