"""qasr.runtime.audio against the official qwen-asr loader, on real speech (tests/data, made by
scripts/make_test_audio.sh with espeak-ng and sox)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from qasr.errors import AudioError
from qasr.runtime.audio import SAMPLE_RATE, cut, load_audio, pad_or_trim, split_long_audio
from support import DATA

# Several languages, rates (8k-48k), channel counts (1, 2, 4), sample types and codecs.
SPEECH = [
    "en_16k_s16.wav",
    "it_8k_s32.wav",
    "de_22k.flac",
    "fr_48k.ogg",
    "en_44k_stereo.mp3",
    "es_48k_stereo.opus",
    "es_16k_4ch.wav",
    "zh_16k_f32_loud.wav",
    "short_44k.wav",
]
NOT_SPEECH = ["noise_16k.wav", "silence_16k.wav"]
FIXTURES = SPEECH + NOT_SPEECH


def official_utils():
    """qwen_asr.inference.utils, the oracle (only installed for tests)."""
    pytest.importorskip("librosa")
    return pytest.importorskip("qwen_asr.inference.utils")


def concatenated_speech(seconds: int) -> np.ndarray:
    """A long 16 kHz clip built from the speech fixtures (long audio is never committed)."""
    clips = [load_audio(DATA / name) for name in SPEECH]
    reps = -(-seconds * SAMPLE_RATE // sum(len(c) for c in clips))
    return np.concatenate(clips * reps)[: seconds * SAMPLE_RATE]


@pytest.mark.parametrize("name", FIXTURES)
def test_files_match_official_loader_exactly(name):
    official = official_utils().normalize_audio_input(str(DATA / name))
    ours = load_audio(DATA / name)
    assert ours.dtype == np.float32 and ours.ndim == 1
    np.testing.assert_array_equal(ours, official)


def test_fixtures_cover_rates_channels_and_formats():
    infos = [sf.info(str(DATA / name)) for name in FIXTURES]
    assert {i.samplerate for i in infos} >= {8000, 16000, 22050, 44100, 48000}
    assert {i.channels for i in infos} >= {1, 2, 4}
    assert {i.subtype for i in infos} >= {"PCM_16", "PCM_32", "FLOAT", "VORBIS", "OPUS", "MPEG_LAYER_III"}
    assert {i.format for i in infos} >= {"WAV", "FLAC", "OGG", "MP3"}
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 1_500_000


def test_sources_agree():
    path = DATA / "de_22k.flac"
    expected = load_audio(str(path))
    with open(path, "rb") as f:
        from_file = load_audio(f)
    samples, rate = sf.read(str(path), dtype="float32")
    for wave in [load_audio(path), load_audio(path.read_bytes()), load_audio(io.BytesIO(path.read_bytes())),
                 from_file, load_audio(samples, sample_rate=rate), load_audio((samples, rate))]:
        np.testing.assert_array_equal(wave, expected)


@pytest.mark.parametrize("rate", [16000, 44100])
@pytest.mark.parametrize("layout", ["mono32", "mono64", "CT", "TC", "tiny_TC"])
def test_arrays_match_official(rate, layout):
    rng = np.random.default_rng(rate)
    n = 5 if layout == "tiny_TC" else 20000
    stereo = (0.4 * rng.standard_normal((n, 2))).astype(np.float32)
    array = {"mono32": stereo[:, 0], "mono64": stereo[:, 0].astype(np.float64), "CT": stereo.T.copy(),
             "TC": stereo, "tiny_TC": stereo}[layout]
    official = official_utils().normalize_audio_input((array, rate))
    np.testing.assert_array_equal(load_audio(array, sample_rate=rate), official)


def test_integer_arrays_use_full_scale():
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_array_equal(load_audio(pcm, sample_rate=16000), pcm / np.float32(32768))
    pcm32 = pcm.astype(np.int32) << 16
    np.testing.assert_array_equal(load_audio(pcm32, sample_rate=16000), pcm / np.float32(32768))


def test_peak_rule():
    loud = load_audio(DATA / "zh_16k_f32_loud.wav")
    assert np.abs(loud).max() == 1.0
    quiet = np.array([0.5, -0.25, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(load_audio(quiet, sample_rate=16000), quiet)
    np.testing.assert_array_equal(load_audio(4 * quiet, sample_rate=16000), 2 * quiet)


def test_resampler_is_librosas_default():
    """soxr HQ is librosa's default resampler; fail loudly if a librosa release changes it."""
    librosa = pytest.importorskip("librosa")
    import inspect

    assert inspect.signature(librosa.resample).parameters["res_type"].default == "soxr_hq"


@pytest.mark.parametrize("name", NOT_SPEECH)
def test_silence_and_noise_are_valid(name):
    wave = load_audio(DATA / name)
    assert len(wave) == SAMPLE_RATE and np.isfinite(wave).all()


def test_pad_or_trim_and_cut():
    wave = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(pad_or_trim(wave, 4), wave[:4])
    np.testing.assert_array_equal(pad_or_trim(wave, 12), np.r_[wave, 0, 0])
    assert pad_or_trim(wave, 12).dtype == np.float32
    second = np.arange(3 * SAMPLE_RATE, dtype=np.float32)
    np.testing.assert_array_equal(cut(second, 1.0, 1.5), second[16000:24000])
    np.testing.assert_array_equal(cut(second, 2.5), second[40000:])


def split_cases():
    rng = np.random.default_rng(7)
    speech = concatenated_speech(60)
    gapped = speech.copy()
    gapped[28 * SAMPLE_RATE : 28 * SAMPLE_RATE + 4000] = 0.0  # a digital-silence gap near a cut
    noise = (0.1 * rng.standard_normal(45 * SAMPLE_RATE)).astype(np.float32)
    return [
        ("speech_20s", speech, 20.0, {}),
        ("speech_7.3s", speech, 7.3, {}),
        ("gapped_25s", gapped, 25.0, {}),
        ("noise_short_tail", noise[: 40 * SAMPLE_RATE + 3000], 10.0, {}),
        ("narrow_search", speech, 9.0, {"search_expand_sec": 0.05}),
        ("tiny_max", speech[:SAMPLE_RATE], 0.05, {}),
        ("not_split", speech[: 5 * SAMPLE_RATE], 20.0, {}),
    ]


@pytest.mark.parametrize("case", split_cases(), ids=lambda c: c[0])
def test_split_matches_official(case):
    _, wave, max_seconds, options = case
    official = official_utils().split_audio_into_chunks(wave, SAMPLE_RATE, max_seconds, **options)
    ours = split_long_audio(wave, max_seconds, search_seconds=options.get("search_expand_sec", 5.0))
    assert len(ours) == len(official)
    for (chunk, offset), (ref_chunk, ref_offset) in zip(ours, official):
        np.testing.assert_array_equal(chunk, ref_chunk)
        assert offset == ref_offset


def test_split_chunks_concatenate_back():
    wave = concatenated_speech(60)
    chunks = split_long_audio(wave, 13.0)
    assert len(chunks) >= 5
    np.testing.assert_array_equal(np.concatenate([c for c, _ in chunks]), wave)
    for (chunk, offset), (_, next_offset) in zip(chunks, chunks[1:]):
        assert abs(offset + len(chunk) / SAMPLE_RATE - next_offset) < 1e-9
        assert 8.0 <= len(chunk) / SAMPLE_RATE <= 18.0


def test_split_pads_short_chunks_only_when_split():
    short = np.ones(SAMPLE_RATE // 4, dtype=np.float32)
    (alone, _), = split_long_audio(short, 10.0)
    assert len(alone) == len(short)
    wave = np.ones(10 * SAMPLE_RATE + 100, dtype=np.float32)
    *_, (tail, _) = split_long_audio(wave, 5.0, search_seconds=0.0)
    assert len(tail) == SAMPLE_RATE // 2 and tail[100:].max() == 0.0


# --- bad input: one AudioError line naming the source ------------------------------------------


def assert_one_line_error(source, *args, names, **kwargs):
    with pytest.raises(AudioError) as info:
        load_audio(source, *args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{names}: "), message
    return message


def bad_files(tmp_path):
    wav = (DATA / "en_16k_s16.wav").read_bytes()
    flac = (DATA / "de_22k.flac").read_bytes()
    files = {
        "text.wav": b"hello, this is not audio\n" * 10,
        "random.bin": np.random.default_rng(0).bytes(5000),
        "truncated_header.wav": wav[:30],
        "header_only.wav": wav[:44],
        "truncated.flac": flac[: len(flac) // 2],
        "zero_bytes.wav": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    sf.write(tmp_path / "no_frames.wav", np.zeros((0, 2), np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan] * 800, np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "inf.wav", np.array([0.1, -np.inf] * 800, np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "rate_100.wav", np.zeros(1000, np.int16), 100)
    sf.write(tmp_path / "rate_1M.wav", np.zeros(1000, np.int16), 1_000_000)
    (tmp_path / "a_directory").mkdir()
    return {
        "missing.wav": "no such file",
        "a_directory": "directory",
        "zero_bytes.wav": "empty",
        "text.wav": "not a readable audio file",
        "random.bin": "not a readable audio file",
        "truncated_header.wav": "not a readable audio file",
        "truncated.flac": "not a readable audio file",
        "header_only.wav": "zero length",
        "no_frames.wav": "zero length",
        "nan.wav": "not finite",
        "inf.wav": "not finite",
        "rate_100.wav": "sample rate 100 Hz is outside",
        "rate_1M.wav": "sample rate 1000000 Hz is outside",
    }


def test_bad_files(tmp_path):
    for name, problem in bad_files(tmp_path).items():
        path = tmp_path / name
        message = assert_one_line_error(path, names=str(path))
        assert problem in message, message
        assert problem in assert_one_line_error(str(path), names=str(path))


def test_bad_bytes_and_file_objects():
    assert "empty" in assert_one_line_error(b"", names="<bytes>")
    assert "not a readable" in assert_one_line_error(b"RIFF" + bytes(100), names="<bytes>")
    assert "not a readable" in assert_one_line_error(io.BytesIO(b"garbage" * 50), names="<file>")
    with open(DATA / "en_16k_s16.wav", "rb") as f:
        assert "arrays only" in assert_one_line_error(f, sample_rate=16000, names=f.name)
    with open(DATA / "en_16k_s16.wav", encoding="latin-1") as f:
        assert "text mode" in assert_one_line_error(f, names=f.name)


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.zeros(0, np.float32), "zero length"),
        (np.zeros((0, 2), np.float32), "zero length"),
        (np.array([0.1, np.nan, 0.2], np.float32), "not finite"),
        (np.array([[0.1, np.inf], [0.2, 0.3]]), "not finite"),
        (np.zeros((2, 3, 100), np.float32), "shape (2, 3, 100)"),
        (np.array(0.5), "shape ()"),
        (np.zeros(100, np.complex64), "complex64"),
        (np.zeros(100, np.uint8), "uint8"),
        (np.zeros(100, bool), "bool"),
        (np.array(["a", "b"]), "<U1"),
    ],
)
def test_bad_arrays(array, problem):
    assert problem in assert_one_line_error(array, sample_rate=16000, names="<array>")


@pytest.mark.parametrize("rate", [0, -16000, 16, 999, 768_001, 1e12, 44100.5, float("nan"), "16000", True, None])
def test_bad_sample_rates(rate):
    message = assert_one_line_error(np.zeros(1600, np.float32), sample_rate=rate, names="<array>")
    assert "sample" in message


def test_bad_source_types():
    assert_one_line_error([0.1, 0.2], names="<list>")
    assert_one_line_error(3, names="<int>")
    assert "twice" in assert_one_line_error((np.zeros(10), 16000), sample_rate=16000, names="<array>")
