"""Random checkpoints in exactly the official on-disk layout, at any size.

No weights can be downloaded, so tests and benchmarks build their own: config.json with
thinker_config, bf16 safetensors with thinker.* names (sharded with an index past a size limit, as
the 1.7B release is), preprocessor_config.json, generation_config.json, and the tokenizer files.
A full-size random checkpoint has the real model's speed and memory.

Weights are drawn with fan-in scaling rather than the tiny initializer_range of a fresh model, so
activations stay O(1) through the layers and the output depends on the audio (a random model
with 0.02-scale weights barely listens to its input, which would let a broken audio path pass).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from qasr.models.checkpoint import EMBED_NAME, HEAD_NAME, INDEX_FILE, SINGLE_FILE, expected_shapes
from qasr.models.config import ALIGNER_MODEL_TYPE, ASR_MODEL_TYPE, parse_config
from qasr.models.synthetic_tokenizer import ADDED_TOKENS, BASE_VOCAB_SIZE, write_tokenizer_files

ASR_LANGUAGES = (
    "Chinese", "English", "Cantonese", "Arabic", "German", "French", "Spanish", "Portuguese", "Indonesian",
    "Italian", "Korean", "Russian", "Thai", "Vietnamese", "Japanese", "Turkish", "Hindi", "Malay", "Dutch",
    "Swedish", "Danish", "Finnish", "Polish", "Czech", "Filipino", "Persian", "Greek", "Romanian", "Hungarian",
    "Macedonian",
)
ALIGNER_LANGUAGES = ("Chinese", "Cantonese", "English", "German", "Spanish", "French", "Italian", "Portuguese",
                     "Russian", "Korean", "Japanese")
ASR_VOCAB, ALIGNER_VOCAB = 151936, 152064
QK_GAIN = 2.0
UNUSED_ROW_SCALE = 0.1


@dataclass(frozen=True)
class Preset:
    """The shape of one checkpoint; the released models and small test shapes."""

    aligner: bool
    audio: dict
    text: dict
    tie: bool
    n_window_infer: int = 800
    classify_num: int = 5000
    max_positions: int = 65536
    languages: tuple[str, ...] = field(default=ASR_LANGUAGES)


def _audio(d, layers, heads, ffn, conv, out):
    return dict(d_model=d, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=ffn,
                downsample_hidden_size=conv, output_dim=out)


def _text(hidden, layers, heads, kv, head_dim, inter):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, intermediate_size=inter)


PRESETS: dict[str, Preset] = {
    # Released shapes (config.json of Qwen3-ASR-0.6B / 1.7B / Qwen3-ForcedAligner-0.6B).
    "0.6b": Preset(False, _audio(896, 18, 14, 3584, 480, 1024), _text(1024, 28, 16, 8, 128, 3072), tie=True),
    "1.7b": Preset(False, _audio(1024, 24, 16, 4096, 480, 2048), _text(2048, 28, 16, 8, 128, 6144), tie=True),
    "aligner": Preset(True, _audio(1024, 24, 16, 4096, 480, 1024), _text(1024, 28, 16, 8, 128, 3072), tie=False,
                      max_positions=8192, languages=ALIGNER_LANGUAGES),
    # Test shapes: heads x head_dim != hidden, GQA and MQA, tied and untied, 8 s and 4 s windows.
    "tiny": Preset(False, _audio(32, 2, 2, 64, 8, 48), _text(48, 2, 4, 2, 16, 96), tie=True),
    "tiny-untied": Preset(False, _audio(32, 2, 4, 64, 8, 40), _text(40, 3, 4, 2, 12, 80), tie=False),
    "tiny-mqa": Preset(False, _audio(24, 1, 3, 48, 4, 40), _text(40, 2, 4, 1, 12, 64), tie=False,
                       n_window_infer=400),
    "tiny-aligner": Preset(True, _audio(32, 2, 2, 64, 8, 32), _text(32, 2, 2, 1, 16, 64), tie=False,
                           max_positions=8192, languages=ALIGNER_LANGUAGES),
}


def official_config(preset: Preset) -> dict:
    """config.json in the released nested layout (thinker_config with audio/text sub-configs)."""
    half = preset.text["head_dim"] // 2
    side = round(half * 20 / 64)
    audio = {
        **preset.audio, "model_type": "qwen3_asr_audio_encoder", "num_mel_bins": 128, "n_window": 50,
        "n_window_infer": preset.n_window_infer, "conv_chunksize": 500, "max_source_positions": 1500,
        "activation_function": "gelu", "scale_embedding": False, "dropout": 0, "attention_dropout": 0,
        "activation_dropout": 0, "num_hidden_layers": preset.audio["encoder_layers"], "initializer_range": 0.02,
    }
    text = {
        **preset.text, "model_type": "qwen3", "hidden_act": "silu", "vocab_size": ALIGNER_VOCAB if preset.aligner
        else ASR_VOCAB, "rope_theta": 1000000, "rms_norm_eps": 1e-06, "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": preset.tie, "use_cache": True,
        "max_position_embeddings": preset.max_positions, "initializer_range": 0.02,
        "rope_scaling": {"interleaved": True, "mrope_interleaved": True, "mrope_section": [half - 2 * side, side, side],
                         "rope_type": "default", "type": "default"},
    }
    thinker = {
        "model_type": ALIGNER_MODEL_TYPE if preset.aligner else ASR_MODEL_TYPE,
        "architectures": ["Qwen3ASRForConditionalGeneration"], "audio_config": audio, "text_config": text,
        "audio_token_id": 151676, "audio_start_token_id": 151669, "audio_end_token_id": 151670,
        "dtype": "bfloat16", "initializer_range": 0.02,
    }
    top = {"architectures": ["Qwen3ASRForConditionalGeneration"], "model_type": ASR_MODEL_TYPE,
           "support_languages": list(preset.languages)}
    if preset.aligner:
        thinker["classify_num"] = preset.classify_num
        top.update(timestamp_token_id=151705, timestamp_segment_time=80)
    return {**top, "thinker_config": thinker, "transformers_version": "4.57.6"}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm scales near 1, small biases, fan-in-scaled weights (embeddings at 1/sqrt(hidden)).

    The decoder's q/k norms get scales near 2: with unit-scale queries and keys the attention of a
    random model is nearly uniform over the prompt, averages the audio away and emits the same
    tokens for every clip; sharper attention makes the output follow the audio.
    """
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return QK_GAIN * (1.0 + 0.1 * torch.randn(shape, generator=generator))
    if name.endswith("norm.weight") or name.endswith("ln_post.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=generator)
    fan_in = shape[-1] if len(shape) == 2 else math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def make_checkpoint(out_dir: str | Path, preset: str | Preset = "tiny", seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 4 << 30) -> Path:
    """Write a random checkpoint directory; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    raw = official_config(preset)
    config = parse_config(raw, str(out / "config.json"))
    real_tokens = write_tokenizer_files(out)
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(config)
    if config.tied_head:
        shapes[HEAD_NAME] = shapes[EMBED_NAME]  # the release stores the tied head too
    vocab_rows = (EMBED_NAME,) if config.is_aligner else (EMBED_NAME, HEAD_NAME)
    tensors = _random_tensors(shapes, generator, dtype, config.tied_head, vocab_rows, real_tokens)
    _write_shards(out, shapes, tensors, dtype, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "eos_token_id": [151643, 151645], "pad_token_id": 151643,
         "transformers_version": "4.57.6"}, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2), encoding="utf-8")
    return out


def _random_tensors(shapes: dict, generator: torch.Generator, dtype: torch.dtype, tied: bool,
                    vocab_rows: tuple[str, ...], real_tokens: int):
    """Yield (name, tensor) in name order; a tied head is a copy of the embedding.

    Rows of the vocabulary that are padding (past the trained tokens, and past the added tokens)
    are scaled down, so a random model mostly writes real text pieces and sometimes an
    end-of-sequence id, as a trained one does, rather than undecodable padding.
    """
    embed = None
    for name, shape in shapes.items():
        if name == HEAD_NAME and tied:
            yield name, embed.clone()
            continue
        tensor = random_tensor(name, shape, generator)
        if name in vocab_rows:
            tensor[real_tokens:BASE_VOCAB_SIZE] *= UNUSED_ROW_SCALE
            tensor[BASE_VOCAB_SIZE + len(ADDED_TOKENS):] *= UNUSED_ROW_SCALE
        tensor = tensor.to(dtype)
        embed = tensor if name == EMBED_NAME else embed
        yield name, tensor


def _write_shards(out: Path, shapes: dict, tensors, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Plan the shards from the shapes, then draw and write one shard at a time (bounded memory)."""
    item = torch.tensor([], dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * item
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    files = [SINGLE_FILE] if len(plan) == 1 else [
        f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    weight_map = {}
    for file, names in zip(files, plan):
        shard = dict(next(tensors) for _ in names)
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    if len(plan) > 1:
        total = sum(math.prod(shape) * item for shape in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")


PREPROCESSOR = {
    "chunk_length": 30, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
    "padding_value": 0.0, "processor_class": "Qwen3ASRProcessor", "return_attention_mask": True,
    "sampling_rate": 16000,
}
