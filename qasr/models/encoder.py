"""The AuT audio encoder and its projector, written as a pure function of one 8-second window.

Nothing in the encoder crosses a window boundary: the conv stack runs per 1 s chunk, the
sinusoidal positions restart every chunk, and attention is block-diagonal over the window's 104
tokens (the semantics of the official vLLM and flash-attention paths). So the graph takes a batch
of fixed-size windows, `mel [W, 128, 800]`, and windows batch freely. Padded keys are masked with
a finite value so the same graph survives fp16 and bf16.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from qasr.models.config import AudioConfig
from qasr.runtime.windows import CHUNK_FRAMES, TOKENS_PER_CHUNK, token_count

MASK_VALUE = -65504.0  # finite in fp16, bf16 and fp32; exp() of it underflows to exactly 0


def sinusoid_table(length: int, channels: int) -> torch.Tensor:
    """The encoder's fixed positions: concat(sin, cos) over a geometric range of timescales."""
    increment = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2).float())
    scaled = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: biased q/k/v/out projections, exact-erf GELU MLP."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        d = config.d_model
        self.heads = config.encoder_attention_heads
        self.self_attn = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        w, t, d = x.shape
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        q, k, v = (attn[n](h).view(w, t, self.heads, -1).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        scores = torch.where(key_valid[:, None, None, :], scores, MASK_VALUE)
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(w, t, d)
        x = x + attn["out_proj"](out)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """mel windows [W, 128, F] -> hidden states [W, 13 F / 100, d_model], F a multiple of 100 up to
    window_frames (a clip's last window needs only the chunks it fills).

    `frames[w]` is the number of valid mel frames in window w (its keys beyond them are masked).
    `conv_frames[w]` is how many frames the conv stack treats as signal: the full window, except
    for a clip shorter than one chunk, which the reference convolves at its exact length (it pads
    only clips with at least one full chunk), so intermediate activations beyond it must be zero.
    """

    def __init__(self, config: AudioConfig):
        super().__init__()
        c = config.downsample_hidden_size
        self.config = config
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv_out = nn.Linear(c * config.conv_freq_bins, config.d_model, bias=False)
        self.register_buffer("positions", sinusoid_table(TOKENS_PER_CHUNK, config.d_model), persistent=False)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, mel: torch.Tensor, frames: torch.Tensor, conv_frames: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        w = mel.shape[0]
        n_chunks = mel.shape[2] // CHUNK_FRAMES  # a window may be cut short to whole chunks
        chunks = mel.reshape(w, cfg.num_mel_bins, n_chunks, CHUNK_FRAMES).permute(0, 2, 1, 3)
        x = chunks.reshape(w * n_chunks, 1, cfg.num_mel_bins, CHUNK_FRAMES)
        offsets = torch.arange(n_chunks, device=mel.device) * CHUNK_FRAMES
        chunk_len = (conv_frames[:, None] - offsets[None, :]).clamp(0, CHUNK_FRAMES).reshape(-1)
        x = F.gelu(self.conv2d1(x))
        x = x * _time_mask(chunk_len, 2, x)
        x = F.gelu(self.conv2d2(x))
        x = x * _time_mask(chunk_len, 4, x)
        x = F.gelu(self.conv2d3(x))
        n, c, f, t = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(n, t, c * f)) + self.positions
        x = x.reshape(w, n_chunks * t, cfg.d_model)
        key_valid = torch.arange(x.shape[1], device=mel.device)[None, :] < token_count(frames)[:, None]
        for layer in self.layers:
            x = layer(x, key_valid)
        return x


def _time_mask(chunk_len: torch.Tensor, stride: int, x: torch.Tensor) -> torch.Tensor:
    """1 where a conv output step of `x` still lies inside its chunk's signal: t < ceil(len / stride)."""
    limit = (chunk_len + stride - 1) // stride
    steps = torch.arange(x.shape[-1], device=x.device)
    return (steps[None, :] < limit[:, None]).to(x.dtype)[:, None, None, :]


class Projector(nn.Module):
    """Encoder states [N, d_model] -> audio embeddings [N, hidden]: ln_post, proj1, GELU, proj2."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.ln_post = nn.LayerNorm(config.d_model)
        self.proj1 = nn.Linear(config.d_model, config.d_model)
        self.proj2 = nn.Linear(config.d_model, config.output_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj2(F.gelu(self.proj1(self.ln_post(hidden))))
