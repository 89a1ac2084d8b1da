"""The Qwen3 decoder with an explicit, static-capacity KV cache.

One forward serves prefill and decode: `S` new tokens at `position` attend to the first `position`
rows of the cache and causally to each other, and the layer's new K/V rows come back as an output
for the caller to write into its cache. No cache object, no growing concat, no Python-side state:
the same module exports to one ONNX graph. The config's interleaved M-RoPE is exactly 1-D RoPE
here (the official code feeds three identical position streams), so plain RoPE is used.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qasr.models.config import TextConfig
from qasr.models.encoder import MASK_VALUE


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: statistics in fp32, scaled in the input dtype (as the reference casts)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE frequencies computed exactly as transformers' default initialiser does.

    Always fp32, also in a bf16 model (computed here rather than held in a buffer, which
    `.to(torch.bfloat16)` would round and visibly degrade the logits).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """GQA with q/k RMSNorm before RoPE; attends to `past` cache rows plus the new rows."""

    def __init__(self, config: TextConfig):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, past_k, past_v, valid):
        """x [B,S,H]; past_k/v [1,kvh,P,hd] (the cache shared by the B rows) or None;
        valid [1, B, 1, S, P+S] -> out [B,S,H], k, v [B,kvh,S,hd].

        The work is laid out kv-head first ([kvh, B, rep x S, hd]): the query heads of one KV head,
        the S positions and the B rows all share a matrix dimension, so the shared cache is scored
        by one matmul per KV head without copying it, and each row's mask keeps its own rows.
        """
        b, s, _ = x.shape
        kvh, rep, hd = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, hd))
        k = self.k_norm(self.k_proj(x).view(b, s, kvh, hd))
        v = self.v_proj(x).view(b, s, kvh, hd).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin) * (hd**-0.5)
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)
        q = q.view(b, s, kvh, rep, hd).permute(2, 0, 3, 1, 4).reshape(kvh, b, rep * s, hd)
        scores = torch.matmul(q, k.transpose(0, 1).transpose(-1, -2))
        if past_k is not None:  # score the cache in place rather than copying it into a concat
            cached = torch.matmul(q.reshape(1, kvh, b * rep * s, hd), past_k.transpose(-1, -2))
            scores = torch.cat([cached.reshape(kvh, b, rep * s, -1), scores], dim=-1)
        scores = scores.reshape(kvh, b, rep, s, -1)
        probs = torch.softmax(torch.where(valid, scores, MASK_VALUE), dim=-1).reshape(kvh, b, rep * s, -1)
        out = torch.matmul(probs[..., -s:], v.transpose(0, 1))
        if past_v is not None:
            cached = torch.matmul(probs[..., :-s].reshape(1, kvh, b * rep * s, -1), past_v)
            out = cached.reshape(kvh, b, rep * s, hd) + out
        out = out.reshape(kvh, b, rep, s, hd).permute(1, 3, 0, 2, 4).reshape(b, s, -1)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, past_k, past_v, valid):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, valid)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Decoder(nn.Module):
    """Embeddings (with audio rows spliced in), the Qwen3 layers and the final norm.

    Parameter names follow the checkpoint's `thinker.model.*` tree; the head lives beside it in
    `DecoderLM`/`AlignerLM` so that a tied head is the embedding tensor itself.
    """

    def __init__(self, config: TextConfig, audio_token_id: int):
        super().__init__()
        self.config = config
        self.audio_token_id = audio_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor, audio_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the rows of <|audio_pad|> replaced, in order, by `audio_embeds`."""
        is_audio = input_ids == self.audio_token_id
        index = (torch.cumsum(is_audio.to(torch.int64), dim=1) - 1).clamp(0, audio_embeds.shape[1] - 1)
        audio = torch.gather(audio_embeds, 1, index[..., None].expand(-1, -1, audio_embeds.shape[-1]))
        return torch.where(is_audio[..., None], audio.to(self.embed_tokens.weight.dtype), self.embed_tokens(input_ids))

    def forward(self, x: torch.Tensor, position: torch.Tensor, past: list[torch.Tensor] | None = None,
                start: torch.Tensor | None = None):
        """x [B,S,H] embeddings of the new tokens at `position` [B]; past: per layer K then V
        [1,kvh,P,hd], one cache shared by the rows; start [B]: each row's first cache row (0 if None).

        Row b's new tokens attend to cache rows start[b] .. start[b]+position[b]-1 and causally to
        each other; returns the normed hidden states [B,S,H] and the new K/V rows [B,L,2,kvh,S,hd]
        for the caller to write at start[b]+position[b] (row-major: each row's block is one strided
        copy into the cache [L,2,1,kvh,P,hd]). Every other cache row is masked, never
        read, so the cache can be preallocated, reused, and shared by requests of different
        lengths, each in its own region. One tensor per layer and kind, rather than one [L,2,...]
        tensor: taking a layer out of a stacked input is a copy of the whole cache on ONNX
        Runtime, at every step.
        """
        s = x.shape[1]
        steps = torch.arange(s, device=x.device)
        angles = (position[:, None] + steps[None, :]).float()[..., None] * rope_inv_freq(
            self.config.head_dim, self.config.rope_theta).to(x.device)
        angles = torch.cat([angles, angles], dim=-1)[:, :, None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        valid = (steps[None, :] <= steps[:, None])[None].expand(x.shape[0], -1, -1)
        if past is not None:
            first = torch.zeros_like(position) if start is None else start
            cached = torch.arange(past[0].shape[2], device=x.device)[None, None, :]
            past_valid = (cached >= first[:, None, None]) & (cached < (first + position)[:, None, None])
            valid = torch.cat([past_valid.expand(-1, s, -1), valid], dim=-1)
        valid = valid[None, :, None]
        rows = []
        for i, layer in enumerate(self.layers):
            past_k, past_v = (None, None) if past is None else (past[2 * i], past[2 * i + 1])
            x, k, v = layer(x, cos, sin, past_k, past_v, valid)
            rows.append(torch.stack([k, v], dim=1))
        return self.norm(x), torch.stack(rows, dim=1)


class _HeadGemm(torch.autograd.Function):
    """h [N,H] x W[rows,H]^T, exported as one Gemm(transB=1) on W as stored.

    Written out because the exporter turns `h @ W^T` into a MatMul on a folded, transposed copy of
    W: for a tied head that stores the embedding table twice (600 MB for the 0.6B model), and the
    Gemm streams W row by row, which ONNX Runtime runs closer to the memory bandwidth.
    """

    @staticmethod
    def forward(ctx, hidden, weight):
        return torch.nn.functional.linear(hidden, weight)

    @staticmethod
    def symbolic(g, hidden, weight):
        return g.op("Gemm", hidden, weight, transB_i=1)


def head_logits(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [N,H] -> logits [N,rows] in fp32."""
    return _HeadGemm.apply(hidden, head.weight).float()


class DecoderLM(nn.Module):
    """The ASR decoder graph: prompt or step tokens in, greedy next token and new K/V rows out."""

    def __init__(self, decoder: Decoder, head: nn.Linear):
        super().__init__()
        self.decoder = decoder
        self.head = head

    def forward(self, input_ids, audio_embeds, position, cache_start, *past):
        """past: per layer K then V [1,kvh,P,hd] -> next_token [B], logits [B,V] of the last position,
        new K/V rows [B,L,2,kvh,S,hd]."""
        hidden, rows = self.decoder(self.decoder.embed(input_ids, audio_embeds), position, list(past), cache_start)
        logits = head_logits(self.head, hidden[:, -1])
        return torch.argmax(logits, dim=-1), logits, rows


class AlignerLM(nn.Module):
    """The aligner graph: one causal pass, class argmax at every <timestamp> slot.

    input_ids [1,S] with audio_embeds [1,A,H] -> class ids [K] and their logits [K,classes], where K
    is the number of timestamp tokens. Hidden states are gathered before the head, so the head
    runs on K rows, not S.
    """

    def __init__(self, decoder: Decoder, head: nn.Linear, timestamp_token_id: int):
        super().__init__()
        self.decoder = decoder
        self.head = head
        self.timestamp_token_id = timestamp_token_id

    def forward(self, input_ids, audio_embeds):
        x = self.decoder.embed(input_ids, audio_embeds)
        position = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        hidden, _ = self.decoder(x, position)
        slots = torch.nonzero(input_ids[0] == self.timestamp_token_id).squeeze(-1)
        logits = head_logits(self.head, hidden[0].index_select(0, slots))
        return torch.argmax(logits, dim=-1), logits
