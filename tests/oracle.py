"""The official qwen-asr package (0.0.6, transformers 4.57.6) as the test oracle.

Two deliberate deviations from loading it plainly, both documented upstream:
- its transformers/sdpa encoder attends across the whole clip; `windowed_encoder()` gives it the
  8 s block-diagonal mask of its vLLM and flash-attention paths (QwenLM/Qwen3-ASR #213, PR #103);
- loading a local directory swaps the tokenizer's split regex for Mistral's; `load_official`
  puts the standard Qwen2 rules back, which the model was trained with.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("qwen_asr")

from qwen_asr import Qwen3ASRModel, Qwen3ForcedAligner  # noqa: E402
from qwen_asr.core.transformers_backend import modeling_qwen3_asr as official_modeling  # noqa: E402

from support import relative_error  # noqa: E402,F401  (re-exported for the parity tests)
from qasr.runtime.tokenizer import qwen2_pre_tokenizer  # noqa: E402


def _qwen2_rules(processor) -> None:
    processor.tokenizer.backend_tokenizer.pre_tokenizer = qwen2_pre_tokenizer()


def load_official(path, max_new_tokens: int = 512) -> Qwen3ASRModel:
    model = Qwen3ASRModel.from_pretrained(str(path), dtype=torch.float32, max_new_tokens=max_new_tokens)
    _qwen2_rules(model.processor)
    return model


def load_official_aligner(path) -> Qwen3ForcedAligner:
    aligner = Qwen3ForcedAligner.from_pretrained(str(path), dtype=torch.float32)
    _qwen2_rules(aligner.processor)
    return aligner


@contextlib.contextmanager
def windowed_encoder():
    """Make the official encoder attend within its cu_seqlens windows (upstream PR #103)."""
    attention = official_modeling.Qwen3ASRAudioAttention
    original = attention.forward

    def forward(self, hidden_states, cu_seqlens=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            window = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())
            allowed = window[:, None] == window[None, :]
            attention_mask = torch.zeros(allowed.shape, dtype=hidden_states.dtype)
            attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(hidden_states.dtype).min)[None, None]
        return original(self, hidden_states, cu_seqlens=cu_seqlens, attention_mask=attention_mask, **kwargs)

    attention.forward = forward
    try:
        yield
    finally:
        attention.forward = original


def asr_inputs(model: Qwen3ASRModel, wav: np.ndarray, context: str = "", language: str | None = None):
    """The processor inputs the official transcribe builds for one clip."""
    prompt = model._build_text_prompt(context=context, force_language=language)
    return model.processor(text=[prompt], audio=[wav], return_tensors="pt", padding=True)


def clip_features(inputs) -> np.ndarray:
    """The one clip's valid log-mel frames [128, T] from processor inputs."""
    frames = int(inputs["feature_attention_mask"][0].sum())
    return inputs["input_features"][0, :, :frames].numpy()


def official_encoder(model, mel: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder states before ln_post [N, d], projected audio embeddings [N, hidden])."""
    tower = model.thinker.audio_tower
    captured = {}

    def keep_input(module, args, output):
        captured["states"] = args[0]

    hook = tower.ln_post.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            out = tower(torch.from_numpy(mel), feature_lens=torch.tensor([mel.shape[1]])).last_hidden_state
    finally:
        hook.remove()
    return captured["states"], out


def official_transcribe(model: Qwen3ASRModel, audio, **kwargs):
    """(result, generated ids with end-of-sequence removed) of the official transcribe, windowed.

    The ids are captured from its generate call; a long clip split into parts gives the parts' ids
    concatenated, as the runtime reports them.
    """
    ids: list[int] = []
    generate = model.model.generate

    def capture(*args, **kw):
        out = generate(*args, **kw)
        prompt = kw["input_ids"].shape[1]
        for row in out.sequences[:, prompt:].tolist():
            ids.extend(t for t in row if t not in (151645, 151643))
        return out

    model.model.generate = capture
    try:
        with windowed_encoder():
            result = model.transcribe(audio, **kwargs)[0]
    finally:
        model.model.generate = generate
    return result, ids
