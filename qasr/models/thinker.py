"""The whole reference model ("thinker"): encoder, projector, decoder and head, loaded from a checkpoint.

This is the PyTorch reference that the exported graphs are checked against, and the source the
exporter traces. It runs in fp32 by default; `.to(torch.bfloat16)` gives the bf16 reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qasr.models.checkpoint import DECODER_PREFIX, ENCODER_PREFIX, HEAD_NAME, load_weights
from qasr.models.config import ModelConfig, load_config
from qasr.models.decoder import AlignerLM, Decoder, DecoderLM
from qasr.models.encoder import AudioEncoder, Projector
from qasr.runtime.windows import join_windows, split_windows

EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>


@dataclass
class Generation:
    """A greedy run: the generated ids (EOS excluded) and the logits [V] of every step."""

    tokens: list[int]
    logits: list[torch.Tensor]
    stopped: bool  # True when an EOS ended the run, False when the budget did


class Thinker(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config.audio)
        self.projector = Projector(config.audio)
        self.decoder = Decoder(config.text, config.audio_token_id)
        self.head = nn.Linear(config.text.hidden_size, config.head_rows, bias=False)
        if config.tied_head:
            self.head.weight = self.decoder.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> Thinker:
        """Load an official checkpoint directory (config.json + safetensors)."""
        config = load_config(checkpoint)
        model = cls(config)
        model.load_official(load_weights(checkpoint, config))
        return model.to(dtype).eval()

    def load_official(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take tensors named as in the checkpoint (thinker.audio_tower.*, thinker.model.*, thinker.lm_head)."""
        projector_keys = {"ln_post.weight", "ln_post.bias", "proj1.weight", "proj1.bias", "proj2.weight", "proj2.bias"}
        encoder, projector, decoder = {}, {}, {}
        for name, tensor in tensors.items():
            if name.startswith(ENCODER_PREFIX):
                key = name[len(ENCODER_PREFIX):]
                (projector if key in projector_keys else encoder)[key] = tensor
            elif name.startswith(DECODER_PREFIX):
                decoder[name[len(DECODER_PREFIX):]] = tensor
        with torch.no_grad():
            self.encoder.load_state_dict(encoder)
            self.projector.load_state_dict(projector)
            self.decoder.load_state_dict(decoder)
            if not self.config.tied_head:
                self.head.weight.copy_(tensors[HEAD_NAME])

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @torch.no_grad()
    def encoder_states(self, mel: np.ndarray) -> torch.Tensor:
        """log-mel [128, T] -> encoder states [N, d_model] (before the projector), window by window."""
        windows, frames, conv_frames = split_windows(mel, self.config.audio.window_frames)
        hidden = self.encoder(torch.from_numpy(windows).to(self.dtype), torch.from_numpy(frames),
                              torch.from_numpy(conv_frames))
        return torch.from_numpy(join_windows(hidden.float().numpy(), frames)).to(self.dtype)

    @torch.no_grad()
    def encode(self, mel: np.ndarray) -> torch.Tensor:
        """log-mel [128, T] -> audio embeddings [N, hidden] that replace the <|audio_pad|> rows."""
        return self.projector(self.encoder_states(mel))

    def lm(self) -> DecoderLM:
        return DecoderLM(self.decoder, self.head)

    def aligner(self) -> AlignerLM:
        return AlignerLM(self.decoder, self.head, self.config.timestamp_token_id)

    @torch.no_grad()
    def generate(self, input_ids: list[int], audio_embeds: torch.Tensor, max_new_tokens: int,
                 eos_ids: tuple[int, ...] = EOS_IDS, forced: list[int] | None = None) -> Generation:
        """Greedy decoding with a static cache sized for the prompt plus the budget.

        `forced` teacher-forces: those ids are fed (and returned) instead of the model's own, so
        a lower-precision model's logits can be compared step by step along a reference run.
        """
        text = self.config.text
        capacity = len(input_ids) + max_new_tokens
        cache = torch.zeros(text.num_hidden_layers, 2, 1, text.num_key_value_heads, capacity, text.head_dim,
                            dtype=self.dtype)
        lm = self.lm()
        ids = torch.tensor([input_ids])
        audio = audio_embeds[None].to(self.dtype)
        position = 0
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        past = [cache[layer, kind] for layer in range(text.num_hidden_layers) for kind in (0, 1)]
        while len(tokens) < max_new_tokens:
            next_token, step_logits, rows = lm(ids, audio, torch.tensor([position]), torch.tensor([0]), *past)
            cache[:, :, :, :, position : position + ids.shape[1]] = rows[0, :, :, None]
            position += ids.shape[1]
            token = int(next_token[0]) if forced is None else forced[len(tokens)]
            logits.append(step_logits[0])
            if token in eos_ids:
                return Generation(tokens, logits, stopped=True)
            tokens.append(token)
            ids = torch.tensor([[token]])
            audio = audio[:, :1]
        return Generation(tokens, logits, stopped=False)
