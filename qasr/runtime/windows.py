"""Cutting a clip's log-mel into the encoder's fixed windows and joining the results.

The encoder graph sees `[W, 128, window_frames]` windows (800 frames, 8 s, for the released
models). A clip is cut at window boundaries from its start and zero-padded at the end, exactly
as the reference pads its last 1-second chunk with zeros. The host then keeps the valid rows of
each window, in order.
"""

from __future__ import annotations

import numpy as np

CHUNK_FRAMES = 100
TOKENS_PER_CHUNK = 13


def token_count(frames):
    """Audio tokens for `frames` mel frames: 13 per full 1 s chunk, ceil(rest / 8) for the tail.

    Plain integer arithmetic, so it serves ints, numpy arrays and the traced graph alike.
    """
    return TOKENS_PER_CHUNK * (frames // CHUNK_FRAMES) + (frames % CHUNK_FRAMES + 7) // 8


def window_count(frames: int, window_frames: int) -> int:
    return max(1, -(-frames // window_frames))


def split_windows(mel: np.ndarray, window_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mel [128, T] -> (windows [W, 128, window_frames], frames [W], conv_frames [W]).

    `frames` counts the valid frames of each window. `conv_frames` is the length the conv stack
    treats as signal: the whole window, except for a clip shorter than one chunk, which the
    reference convolves at its exact length instead of padding it to a full chunk.
    """
    bins, total = mel.shape
    count = window_count(total, window_frames)
    windows = np.zeros((count, bins, window_frames), dtype=np.float32)
    starts = np.arange(count) * window_frames
    for w, start in enumerate(starts):
        piece = mel[:, start : start + window_frames]
        windows[w, :, : piece.shape[1]] = piece
    frames = np.minimum(total - starts, window_frames).astype(np.int64)
    conv_frames = np.full(count, window_frames, dtype=np.int64)
    if total < CHUNK_FRAMES:
        conv_frames[:] = total
    return windows, frames, conv_frames


def join_windows(hidden: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Encoder output [W, window_tokens, d] -> the clip's valid rows [N, d], in time order."""
    return np.concatenate([hidden[w, : token_count(int(f))] for w, f in enumerate(frames)], axis=0)
