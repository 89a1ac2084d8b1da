"""Audio input: any file, bytes or array to the waveform Qwen3-ASR hears (mono, 16 kHz, float32).

It reproduces the official qwen-asr input path (`normalize_audio_input`): decode with libsndfile,
average the channels, resample with soxr at HQ (librosa's default resampler, `soxr_hq`, then its
length fix to ceil(n * 16000 / sr)), and the peak rule (divide by the peak when it exceeds 1, clip
to [-1, 1]). Waveforms match the official loader bit for bit on files. Deliberate differences, all
on inputs the official package mishandles: integer arrays are scaled by their full scale (int16 /
32768, as the official streaming path does) instead of by their peak; files with more than 8
channels are averaged over channels (the official (C, T) heuristic averages them over time).

Bad input raises `AudioError` with one line naming the source and the problem.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf
import soxr

from qasr.errors import AudioError

SAMPLE_RATE = 16000
# libsndfile and soxr take any positive rate; rates outside this range come from broken headers or
# unit mistakes (kHz passed as Hz), never from real recordings (8 kHz telephony to 768 kHz DXD).
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
_MAX_CHANNELS_AS_ROWS = 8  # the official heuristic: a 2-D array with <= 8 rows may be (C, T)

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, tuple]


def load_audio(source: AudioSource, sample_rate: int | None = None) -> np.ndarray:
    """Mono 16 kHz float32 waveform in [-1, 1] from a path, a file's bytes, a binary file, or an array.

    An array needs its sample rate: `load_audio(array, sample_rate=sr)` or `load_audio((array, sr))`.
    """
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        if sample_rate is not None:
            raise AudioError("<array>: sample rate given twice (in the tuple and as sample_rate)")
        source, sample_rate = source
    if isinstance(source, np.ndarray):
        name = "<array>"
        if sample_rate is None:
            raise AudioError(f"{name}: an array needs its sample_rate")
        rate = _check_rate(name, sample_rate)
        wave = _array_mono(name, source)
    else:
        name = _source_name(source)
        if sample_rate is not None:
            raise AudioError(f"{name}: sample_rate is for arrays only; a file carries its own")
        samples, file_rate = _decode(name, source)
        rate = _check_rate(name, file_rate)
        wave = samples[:, 0] if samples.shape[1] == 1 else _mix(samples)
    return _normalize(name, wave, rate)


def source_path(source: object) -> str | None:
    """The file path of an audio source when it is one (results report it), else None."""
    return os.fsdecode(source) if isinstance(source, (str, os.PathLike)) else None


def _source_name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return name if isinstance(name, str) else "<file>"
    raise AudioError(f"<{type(source).__name__}>: not an audio source (path, bytes, file or array)")


def _decode(name: str, source: AudioSource) -> tuple[np.ndarray, int]:
    """Decoded samples [T, C] as float32 (libsndfile scales integer PCM to [-1, 1))."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise AudioError(f"{name}: no such file")
        if os.path.isdir(source):
            raise AudioError(f"{name}: is a directory, not an audio file")
        if not os.access(source, os.R_OK):
            raise AudioError(f"{name}: permission denied")
        if os.path.getsize(source) == 0:
            raise AudioError(f"{name}: empty file (0 bytes)")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError(f"{name}: empty (0 bytes)")
        source = io.BytesIO(source)
    elif isinstance(source, io.TextIOBase):
        raise AudioError(f"{name}: a file opened in text mode; open it with 'rb'")
    try:
        with _decoder_notes_silenced():
            samples, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        raise AudioError(f"{name}: not a readable audio file ({_one_line(exc)})") from exc
    return samples, rate


# libsndfile's message when no decoder takes a file; it names a missing file, but reaching it
# means the file exists and is readable (checked above): it is not in a format libsndfile knows.
_NOT_RECOGNISED = "File does not exist or is not a regular file"
_DECODER_NOTE = re.compile(rb"^(Note|Warning|Error): |^\[src/libmpg123/")
_stderr_lock = threading.Lock()


@contextmanager
def _decoder_notes_silenced():
    """Keep libmpg123's notes ("Note: Illegal Audio-MPEG-Header ...") off the terminal.

    libsndfile hands any file it cannot identify to libmpg123, which writes to file descriptor 2
    itself, so the user saw three lines of noise before qasr's one line. Descriptor 2 goes to a
    temporary file while the decoder runs; lines that are not the decoder's are written back.
    """
    with _stderr_lock, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not _DECODER_NOTE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def _one_line(exc: Exception) -> str:
    detail = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    if _NOT_RECOGNISED in str(detail):
        return "not a recognised audio format"
    return " ".join(str(detail).split())


def _array_mono(name: str, array: np.ndarray) -> np.ndarray:
    """Mono samples of a caller's array, whatever its layout and sample type."""
    if array.dtype.kind == "i":
        array = array.astype(np.float32) / np.float32(2 ** (8 * array.dtype.itemsize - 1))
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype not in (np.float32, np.float64):
        raise AudioError(f"{name}: unsupported sample type {array.dtype} (use float or signed int)")
    if array.ndim == 1:
        return array  # a float64 clip stays float64 until after resampling, as in librosa
    if array.ndim != 2:
        raise AudioError(f"{name}: expected 1-D samples or a 2-D channels array, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.float32)  # nothing to mix; _normalize reports it
    rows, cols = array.shape
    return _mix(array.T if rows <= _MAX_CHANNELS_AS_ROWS and cols > rows else array)


def _mix(samples: np.ndarray) -> np.ndarray:
    """[T, C] -> [T]: the channel average, in float32 like the official mix."""
    return samples.mean(axis=1).astype(np.float32)


def _check_rate(name: str, sample_rate: object) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise AudioError(f"{name}: sample rate must be a number of Hz, got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name}: sample rate {sample_rate} Hz is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz"
        )
    if not float(sample_rate).is_integer():
        raise AudioError(f"{name}: sample rate {sample_rate} Hz is not a whole number of Hz")
    return int(sample_rate)


def _normalize(name: str, wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono samples -> the official waveform: 16 kHz, float32, peak rule."""
    if len(wave) == 0:
        raise AudioError(f"{name}: no audio samples (zero length)")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: samples are not finite (NaN or Inf)")
    if sample_rate != SAMPLE_RATE:
        n_out = int(np.ceil(len(wave) * (SAMPLE_RATE / sample_rate)))  # librosa's float expression
        wave = pad_or_trim(soxr.resample(wave, sample_rate, SAMPLE_RATE, quality="HQ"), n_out)
    wave = np.asarray(wave, dtype=np.float32)
    peak = float(np.max(np.abs(wave)))
    if peak > 1.0:
        wave = wave / peak
    return np.clip(wave, -1.0, 1.0)


def pad_or_trim(wave: np.ndarray, length: int) -> np.ndarray:
    """Exactly `length` samples: zeros added at the end, or the end cut off."""
    if len(wave) >= length:
        return wave[:length]
    return np.pad(wave, (0, length - len(wave)))


def cut(wave: np.ndarray, start: float, end: float | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The samples between two times in seconds (a view); `end=None` runs to the end."""
    stop = None if end is None else round(end * sample_rate)
    return wave[round(start * sample_rate) : stop]


def split_long_audio(
    wave: np.ndarray,
    max_seconds: float,
    search_seconds: float = 5.0,
    window_ms: float = 100.0,
    min_seconds: float = 0.5,
    sample_rate: int = SAMPLE_RATE,
) -> list[tuple[np.ndarray, float]]:
    """Cut audio longer than max_seconds at its quietest points; [(chunk, offset_seconds)].

    The official `split_audio_into_chunks`, result for result: each cut goes to the quietest
    `window_ms` window within +-search_seconds of start + max_seconds, at its quietest sample. The
    chunks concatenate back to the input exactly; then, on this split path only, chunks shorter
    than min_seconds are zero-padded at the end (the model needs half a second).
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"split_long_audio expects mono samples, got shape {wave.shape}")
    if len(wave) / sample_rate <= max_seconds:
        return [(wave, 0.0)]
    window = max(4, int(window_ms / 1000.0 * sample_rate))
    bounds = _cut_points(wave, int(max_seconds * sample_rate), int(search_seconds * sample_rate), window)
    min_length = int(min_seconds * sample_rate)
    chunks = [wave[a:b] for a, b in itertools.pairwise(bounds)]
    # Offsets accumulate chunk durations, as the official loop does, so the floats agree exactly.
    offsets = itertools.accumulate((len(c) / sample_rate for c in chunks[:-1]), initial=0.0)
    return [(pad_or_trim(c, max(len(c), min_length)), off) for c, off in zip(chunks, offsets)]


def _cut_points(wave: np.ndarray, max_length: int, search: int, window: int) -> list[int]:
    """Chunk boundaries [0, ..., len(wave)]: each the quietest sample of the quietest window."""
    bounds = [0]
    box = np.ones(window, dtype=np.float32)
    while len(wave) - bounds[-1] > max_length:
        start = bounds[-1]
        target = start + max_length
        left, right = max(start, target - search), min(len(wave), target + search)
        boundary = target
        if right - left > window:
            magnitude = np.abs(wave[left:right])
            # float32 box sums, as the official np.convolve computes them: ties break the same way.
            quietest = int(np.argmin(np.convolve(magnitude, box, mode="valid")))
            boundary = left + quietest + int(np.argmin(magnitude[quietest : quietest + window]))
        bounds.append(min(max(boundary, start + 1), len(wave)))
    bounds.append(len(wave))
    return bounds
