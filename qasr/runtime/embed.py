"""From a waveform to the audio embeddings that fill the prompt's <|audio_pad|> rows.

log-mel, cut into the encoder's windows, encoded a few windows at a time (so the encoder's memory
is bounded by the window batch, not by the recording's length), valid rows joined, projected.
Shared by speech recognition and the forced aligner.
"""

from __future__ import annotations

import time

import numpy as np

from qasr.errors import AudioError
from qasr.kernels.fbank import log_mel
from qasr.runtime.backends.interface import Backend
from qasr.runtime.windows import CHUNK_FRAMES, join_windows, split_windows

WINDOW_BATCH = 2  # encoder windows per call: 16 s; larger batches ran slower (cache) and grew the peak memory


def embed_audio(backend: Backend, wave: np.ndarray, window_frames: int, timings: dict | None = None,
                source: str = "<audio>", peak: float = -np.inf) -> np.ndarray:
    """Audio embeddings [N, hidden] of a 16 kHz waveform; adds 'frontend' and 'encoder' seconds to timings.

    Only the features [128, T] and the embeddings (which the decoder needs whole) grow with the
    recording; windows and encoder states exist one batch at a time. `peak`: a louder log10 mel
    bin heard before the clip, which sets the clamp floor instead of the clip's own (a stream's
    later segment).
    """
    timings = {} if timings is None else timings
    start = time.perf_counter()
    mel = log_mel(wave, peak)
    if mel.shape[1] == 0:
        raise AudioError(f"{source}: too short ({len(wave)} samples; at least 160, 10 ms, are needed)")
    add_time(timings, "frontend", time.perf_counter() - start)
    return embed_features(backend, mel, window_frames, timings)


def embed_features(backend: Backend, mel: np.ndarray, window_frames: int, timings: dict | None = None,
                   later: bool = False) -> np.ndarray:
    """Audio embeddings [N, hidden] of log-mel features [128, T]; adds 'encoder' seconds to timings.

    `later`: the features are whole windows of a longer clip after its first window (a stream
    re-encoding some of its windows), so even a part shorter than a chunk convolves as a window.
    """
    start = time.perf_counter()
    embeds = []
    for begin, end in window_batches(mel.shape[1], window_frames):
        windows, frames, conv_frames = split_windows(mel[:, begin:end], window_frames)
        if begin or later:  # past a clip's first batch no clip is shorter than a chunk: convolve whole windows
            conv_frames[:] = window_frames
        used = -(-int(frames.max()) // CHUNK_FRAMES) * CHUNK_FRAMES  # whole chunks, no empty ones
        hidden = backend.encode(np.ascontiguousarray(windows[:, :, :used]), frames, conv_frames)
        embeds.append(backend.project(join_windows(hidden, frames)))
    if timings is not None:
        add_time(timings, "encoder", time.perf_counter() - start)
    return np.concatenate(embeds)


def window_batches(total: int, window_frames: int) -> list[tuple[int, int]]:
    """Frame ranges encoded per call: full windows WINDOW_BATCH at a time, then a partial last
    window on its own, cut to the chunks it fills (a 10 s clip is 10 chunks of work, not 16)."""
    full = total - total % window_frames
    span = WINDOW_BATCH * window_frames
    batches = [(begin, min(begin + span, full)) for begin in range(0, full, span)]
    return batches + ([(full, total)] if full < total else [])


def add_time(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds
