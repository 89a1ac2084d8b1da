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
from qasr.runtime.backend import Backend
from qasr.runtime.windows import join_windows, split_windows

WINDOW_BATCH = 2  # encoder windows per call: 16 s; larger batches ran slower (cache) and grew the peak memory


def embed_audio(backend: Backend, wave: np.ndarray, window_frames: int, timings: dict | None = None,
                source: str = "<audio>") -> np.ndarray:
    """Audio embeddings [N, hidden] of a 16 kHz waveform; adds 'frontend' and 'encoder' seconds to timings.

    Only the features [128, T] and the embeddings (which the decoder needs whole) grow with the
    recording; windows and encoder states exist one batch at a time.
    """
    timings = {} if timings is None else timings
    start = time.perf_counter()
    mel = log_mel(wave)
    if mel.shape[1] == 0:
        raise AudioError(f"{source}: too short ({len(wave)} samples; at least 160, 10 ms, are needed)")
    add_time(timings, "frontend", time.perf_counter() - start)
    start = time.perf_counter()
    span = WINDOW_BATCH * window_frames
    embeds = []
    for begin in range(0, mel.shape[1], span):
        windows, frames, conv_frames = split_windows(mel[:, begin : begin + span], window_frames)
        if begin:  # a later batch holds no clip shorter than a chunk: convolve whole windows
            conv_frames[:] = window_frames
        embeds.append(backend.project(join_windows(backend.encode(windows, frames, conv_frames), frames)))
    add_time(timings, "encoder", time.perf_counter() - start)
    return np.concatenate(embeds)


def add_time(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds
