"""The model description read from an official checkpoint's config.json.

Every dimension comes from the json: the class defaults in the official configuration file are not
the released values (rope_theta 5e6, d_model 1280, n_window 100 ...), so nothing here has a model
default. This module is free of torch so that the exporter and the tools can read a checkpoint's
shape without loading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from qasr.errors import CheckpointError
from qasr.jsonfile import read_json
from qasr.runtime.windows import CHUNK_FRAMES, TOKENS_PER_CHUNK

ASR_MODEL_TYPE = "qwen3_asr"
ASR_MODEL_TYPES = (ASR_MODEL_TYPE, "qwen3_asr_thinker")  # released json / official save_pretrained
ALIGNER_MODEL_TYPE = "qwen3_forced_aligner"
AUDIO_START_ID, AUDIO_END_ID = 151669, 151670  # <|audio_start|>, <|audio_end|>
MEL_BINS = 128
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class AudioConfig:
    """The AuT audio encoder and its projector (audio_config)."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    downsample_hidden_size: int
    output_dim: int
    n_window: int
    n_window_infer: int
    num_mel_bins: int = MEL_BINS

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def window_chunks(self) -> int:
        """1-second chunks per attention window (8 for the released models: 8 s windows)."""
        return self.n_window_infer // (2 * self.n_window)

    @property
    def window_frames(self) -> int:
        return self.window_chunks * CHUNK_FRAMES

    @property
    def window_tokens(self) -> int:
        return self.window_chunks * TOKENS_PER_CHUNK

    @property
    def conv_freq_bins(self) -> int:
        """Mel bins left after three stride-2 convolutions (128 -> 16)."""
        bins = self.num_mel_bins
        for _ in range(3):
            bins = (bins + 1) // 2
        return bins


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder (text_config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """One released model: Qwen3-ASR (0.6B, 1.7B) or Qwen3-ForcedAligner."""

    model_type: str
    audio: AudioConfig
    text: TextConfig
    audio_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    support_languages: tuple[str, ...]
    classify_num: int | None = None
    timestamp_token_id: int | None = None
    timestamp_segment_time: float | None = None

    @property
    def is_aligner(self) -> bool:
        return self.model_type == ALIGNER_MODEL_TYPE

    @property
    def fusable(self) -> bool:
        """Whether the fused decoder graph can be built: an ASR model whose head size GroupQueryAttention's
        rotary kernels take (multiples of 16; the released models' 128)."""
        return not self.is_aligner and self.text.head_dim % 16 == 0

    @property
    def head_rows(self) -> int:
        """Rows of the output head: the vocabulary, or the aligner's time classes."""
        return self.classify_num if self.is_aligner else self.text.vocab_size

    @property
    def tied_head(self) -> bool:
        """The ASR head reuses embed_tokens; the aligner's class head never does."""
        return self.text.tie_word_embeddings and not self.is_aligner

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The inverse of to_dict: a bundle's manifest carries its model's config this way."""
        return cls(**{**data, "audio": AudioConfig(**data["audio"]), "text": TextConfig(**data["text"]),
                      "support_languages": tuple(data["support_languages"])})


def load_config(checkpoint: str | Path) -> ModelConfig:
    """Read config.json of a checkpoint directory; any missing or unknown value is a CheckpointError."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a Qwen3-ASR checkpoint directory?)")
    return parse_config(read_json(path, CheckpointError), str(path))


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the official nested layout (config.json with thinker_config)."""
    reader = _Reader(raw, source)
    thinker = reader.section(raw, "thinker_config")
    aligner = _is_aligner(reader, raw, thinker)
    audio = _audio_config(reader, reader.section(thinker, "audio_config"))
    text = _text_config(reader, reader.section(thinker, "text_config"))
    config = ModelConfig(
        model_type=ALIGNER_MODEL_TYPE if aligner else ASR_MODEL_TYPE,
        audio=audio,
        text=text,
        audio_token_id=int(reader.get(thinker, "audio_token_id", "thinker_config")),
        audio_start_token_id=int(thinker.get("audio_start_token_id") or AUDIO_START_ID),
        audio_end_token_id=int(thinker.get("audio_end_token_id") or AUDIO_END_ID),
        support_languages=tuple(raw.get("support_languages") or ()),
        classify_num=int(reader.get(thinker, "classify_num", "thinker_config")) if aligner else None,
        timestamp_token_id=int(reader.get(raw, "timestamp_token_id", "top level")) if aligner else None,
        timestamp_segment_time=(
            float(reader.get(raw, "timestamp_segment_time", "top level")) if aligner else None
        ),
    )
    _check(config, source)
    return config


def _is_aligner(reader: "_Reader", raw: dict, thinker: dict) -> bool:
    """The aligner says so in thinker_config.model_type, as released.

    The official save_pretrained rewrites that field to "qwen3_asr_thinker" (its class default),
    so a checkpoint that carries the aligner's classify_num and timestamp ids is one too.
    """
    model_type = reader.get(thinker, "model_type", "thinker_config")
    if "forced_aligner" in model_type:
        return True
    if model_type not in ASR_MODEL_TYPES:
        raise CheckpointError(
            f"{reader.source}: unknown model type {model_type!r} "
            f"(expected one of {', '.join(ASR_MODEL_TYPES + (ALIGNER_MODEL_TYPE,))})"
        )
    return "classify_num" in thinker and "timestamp_token_id" in raw


class _Reader:
    """Looks keys up and turns every absence into one CheckpointError line naming the key."""

    def __init__(self, raw: dict, source: str):
        self.raw = raw
        self.source = source

    def section(self, parent: dict, key: str) -> dict:
        value = parent.get(key)
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.source}: no {key!r} section (not the official layout)")
        return value

    def get(self, section: dict, key: str, where: str):
        if section.get(key) is None:
            raise CheckpointError(f"{self.source}: {where} has no {key!r}")
        return section[key]


def _audio_config(reader: _Reader, sec: dict) -> AudioConfig:
    names = [
        "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
        "downsample_hidden_size", "output_dim", "n_window", "n_window_infer", "num_mel_bins",
    ]
    values = {n: int(reader.get(sec, n, "audio_config")) for n in names}
    act = sec.get("activation_function", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{reader.source}: audio activation {act!r} is not supported (gelu)")
    return AudioConfig(**values)


def _text_config(reader: _Reader, sec: dict) -> TextConfig:
    ints = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads",
    ]
    values = {n: int(reader.get(sec, n, "text_config")) for n in ints}
    act = sec.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{reader.source}: text activation {act!r} is not supported (silu)")
    if sec.get("attention_bias"):
        raise CheckpointError(f"{reader.source}: attention_bias=true is not supported")
    head_dim = sec.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
    return TextConfig(
        **values,
        head_dim=int(head_dim),
        rope_theta=float(reader.get(sec, "rope_theta", "text_config")),
        rms_norm_eps=float(sec.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(sec.get("tie_word_embeddings", False)),
        max_position_embeddings=int(sec.get("max_position_embeddings", 65536)),
    )


def _check(config: ModelConfig, source: str) -> None:
    """Reject shapes the exported graphs cannot represent, with the reason."""
    audio, text = config.audio, config.text
    problems = []
    if audio.num_mel_bins != MEL_BINS:
        problems.append(f"num_mel_bins {audio.num_mel_bins} (the frontend makes {MEL_BINS})")
    if 2 * audio.n_window != CHUNK_FRAMES:
        problems.append(f"n_window {audio.n_window} (the released models use 50: 1 s chunks)")
    if audio.n_window_infer % (2 * audio.n_window) or audio.window_chunks < 1:
        problems.append(f"n_window_infer {audio.n_window_infer} (must be a multiple of {2 * audio.n_window})")
    if audio.d_model % audio.encoder_attention_heads:
        problems.append("d_model is not a multiple of encoder_attention_heads")
    if text.num_attention_heads % text.num_key_value_heads:
        problems.append("num_attention_heads is not a multiple of num_key_value_heads")
    if text.head_dim % 2:
        problems.append("head_dim is odd (RoPE needs pairs)")
    if audio.output_dim != text.hidden_size:
        problems.append(f"audio output_dim {audio.output_dim} != text hidden_size {text.hidden_size}")
    if config.audio_token_id >= text.vocab_size:
        problems.append("audio_token_id is outside the embedding table")
    if problems:
        raise CheckpointError(f"{source}: unsupported model shape: " + "; ".join(problems))
