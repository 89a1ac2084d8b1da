"""The small interface every inference engine implements over the bundle's graph contracts.

Each implementation is one file in this folder, listed once in qasr.runtime.backends.select.

The greedy loop, the KV-cache bookkeeping and the pipelines are written once against it and
tested on ONNX Runtime; TensorRT implements the same calls with its cache on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # a GPU's compute type (qasr.runtime.backends.select)


class Backend(ABC):
    name: str    # what --backend calls it
    device_label: str  # where it computes, in words (the server's page shows it)

    @abstractmethod
    def encode(self, mel: np.ndarray, frames: np.ndarray, conv_frames: np.ndarray) -> np.ndarray:
        """Encoder windows [W, 128, F] -> hidden states [W, window_tokens, d_model]."""

    @abstractmethod
    def project(self, hidden: np.ndarray) -> np.ndarray:
        """Encoder states [N, d_model] -> audio embeddings [N, hidden]."""

    def release(self, graphs: tuple[str, ...]) -> None:
        """Free these graphs' weights until their next call, which loads them again: a process that
        has encoded its last recording decodes without the audio encoder. An engine that cannot
        free a graph keeps it (this default)."""

    holder: object | None = None  # the batch engine whose requests the cache's rows hold (it sets this)

    @property
    @abstractmethod
    def reserved(self) -> int:
        """Rows the shared cache holds now."""

    @abstractmethod
    def reserve(self, rows: int, keep: bool = True) -> None:
        """Size the KV cache shared by all requests to `rows` token rows, keeping the rows it holds
        when `keep` (else they may be dropped). New rows are zero: a masked row still meets a zero
        attention weight, and 0 x NaN from uninitialised memory would poison the output."""

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, audio_embeds: np.ndarray, start: int, position: int) -> int:
        """Run one request's ids [1, S] at `position`, its cache region beginning at row `start`;
        store their K/V rows there and return the greedy next id."""

    @abstractmethod
    def step(self, ids: np.ndarray, starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step of B requests: ids [B] at positions [B] of the regions at starts [B];
        stores each row's K/V and returns the greedy next ids [B]."""

    @abstractmethod
    def step_logits(self) -> np.ndarray:
        """Logits [B, vocab] of the last position of each row of the last `prefill` or `step`."""

    @abstractmethod
    def align(self, input_ids: np.ndarray, audio_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligner pass: ids [1, S] -> (class ids [K], logits [K, classes]) at the timestamp slots."""
