"""Loading the official Hugging Face checkpoints (thinker.* tensors in safetensors).

A checkpoint is a directory with config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Every tensor the model needs is checked by name and shape against
the config before any weight is used, so a truncated download or a mismatched file fails with one
line that names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from qasr.errors import CheckpointError, first_line
from qasr.models.config import INDEX_FILE, SINGLE_FILE, ModelConfig, load_config

if TYPE_CHECKING:  # torch and safetensors load on first read, so shapes and counts need neither
    import torch
ENCODER_PREFIX = "thinker.audio_tower."
DECODER_PREFIX = "thinker.model."
HEAD_NAME = "thinker.lm_head.weight"
EMBED_NAME = DECODER_PREFIX + "embed_tokens.weight"
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
BLOCK_BYTES = 64 << 20  # rows read at a time by the bounded export


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, by its official name.

    The head is listed only when the model needs it stored: a tied ASR head may be absent (the
    official save_pretrained drops it) and is then read from embed_tokens.
    """
    shapes = {ENCODER_PREFIX + k: v for k, v in _encoder_shapes(config).items()}
    shapes.update({DECODER_PREFIX + k: v for k, v in _decoder_shapes(config).items()})
    if not config.tied_head:
        shapes[HEAD_NAME] = (config.head_rows, config.text.hidden_size)
    return shapes


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per part: encoder (conv stack and layers), projector, decoder layers, embedding, head."""
    counts = dict.fromkeys(("encoder", "projector", "decoder", "embedding", "head"), 0)
    for name, shape in expected_shapes(config).items():
        counts[_part(name)] += math.prod(shape)
    return counts


def _part(name: str) -> str:
    if name.startswith(ENCODER_PREFIX):
        return "projector" if name[len(ENCODER_PREFIX):].startswith(("ln_post", "proj1", "proj2")) else "encoder"
    if name == EMBED_NAME:
        return "embedding"
    return "head" if name == HEAD_NAME else "decoder"


def _encoder_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    a = config.audio
    d, c, f = a.d_model, a.downsample_hidden_size, a.encoder_ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "conv2d1.weight": (c, 1, 3, 3), "conv2d1.bias": (c,),
        "conv2d2.weight": (c, c, 3, 3), "conv2d2.bias": (c,),
        "conv2d3.weight": (c, c, 3, 3), "conv2d3.bias": (c,),
        "conv_out.weight": (d, c * a.conv_freq_bins),
        "ln_post.weight": (d,), "ln_post.bias": (d,),
        "proj1.weight": (d, d), "proj1.bias": (d,),
        "proj2.weight": (a.output_dim, d), "proj2.bias": (a.output_dim,),
    }
    for i in range(a.encoder_layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{p}self_attn.{proj}.bias"] = (d,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"] = (d,)
            shapes[f"{p}{norm}.bias"] = (d,)
        shapes[f"{p}fc1.weight"], shapes[f"{p}fc1.bias"] = (f, d), (f,)
        shapes[f"{p}fc2.weight"], shapes[f"{p}fc2.bias"] = (d, f), (d,)
    return shapes


def _decoder_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    t = config.text
    h, hd, i = t.hidden_size, t.head_dim, t.intermediate_size
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (t.vocab_size, h), "norm.weight": (h,)}
    for n in range(t.num_hidden_layers):
        p = f"layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def weight_files(checkpoint: Path) -> dict[str, Path]:
    """Map each stored tensor name to the safetensors file that holds it."""
    index = checkpoint / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        return {name: checkpoint / file for name, file in weight_map.items()}
    single = checkpoint / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{checkpoint}: no {SINGLE_FILE} or {INDEX_FILE}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {INDEX_FILE})")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None



def check_checkpoint(checkpoint: str | Path, config: ModelConfig | None = None) -> dict[str, Path]:
    """Validate names and shapes from the safetensors headers alone (no weight is read).

    Returns the file of every tensor the model uses. Fast enough for `qasr info`, and catches
    truncated files, missing shards, missing tensors and shapes that disagree with config.json.
    """
    checkpoint = Path(checkpoint)
    config = config or load_config(checkpoint)
    shapes = expected_shapes(config)
    files = weight_files(checkpoint)
    missing = sorted(set(shapes) - set(files))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{checkpoint}: tensor {missing[0]}{more} not found in the checkpoint")
    wanted = {name: files[name] for name in sorted(set(shapes) | ({HEAD_NAME} & set(files)))}
    for path in sorted(set(wanted.values())):
        with _open(path) as f:
            for name in (n for n, p in wanted.items() if p == path):
                _check_header(f, path, name, shapes.get(name))
    return wanted


def _check_header(f, path: Path, name: str, shape: tuple[int, ...] | None) -> None:
    found = f.get_slice(name)
    if shape is not None and tuple(found.get_shape()) != shape:
        raise CheckpointError(
            f"{path}: tensor {name} has shape {list(found.get_shape())}, config.json implies {list(shape)}"
        )
    if found.get_dtype() not in FLOAT_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {found.get_dtype()}, expected a float type")


def load_weights(checkpoint: str | Path, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Read, check and return the checkpoint's tensors in float32, keyed by their official names.

    The returned dict always holds the head under HEAD_NAME; for a tied head it is the same
    tensor object as the embedding, so exporters store it once.
    """
    checkpoint = Path(checkpoint)
    config = config or load_config(checkpoint)
    wanted = check_checkpoint(checkpoint, config)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(set(wanted.values())):
        with _open(path) as f:
            for name in (n for n, p in wanted.items() if p == path):
                tensors[name] = _read(f, path, name)
    return _resolve_head(config, tensors, checkpoint)


def _read(f, path: Path, name: str) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return f.get_tensor(name).float()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: tensor {name} cannot be read ({first_line(exc)})") from None


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor in float32, the file opened for it alone.

    safetensors maps the whole file; the pages a read touches count as this process's memory
    until the map closes, so a reader that keeps the file open grows to the checkpoint's size.
    """
    with _open(path) as f:
        return _read(f, path, name)


def read_rows(path: Path, name: str, block_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """A tensor in blocks of rows of about `block_bytes` in float32, the file opened per block, so that
    reading the 1.24 GB embedding of the 1.7B holds one block of it at a time."""
    with _open(path) as f:
        shape = f.get_slice(name).get_shape()
    if not shape:
        yield read_tensor(path, name)
        return
    step = max(1, block_bytes // (4 * math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        with _open(path) as f:
            yield _read_slice(f, path, name, start, start + step).float()


def _read_slice(f, path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return f.get_slice(name)[start:stop]
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: tensor {name} cannot be read ({first_line(exc)})") from None


def official_name(parameter: str) -> str:
    """The checkpoint name of a Thinker parameter (`decoder.layers.0...` -> `thinker.model.layers.0...`)."""
    part, _, rest = parameter.partition(".")
    if part in ("encoder", "projector"):
        return ENCODER_PREFIX + rest
    if part == "decoder":
        return DECODER_PREFIX + rest
    if parameter == "head.weight":
        return HEAD_NAME
    raise CheckpointError(f"{parameter}: not a parameter of the official checkpoint")


def warn_if_head_untied(checkpoint: Path, config: ModelConfig, files: dict[str, Path]) -> None:
    """The warning `load_weights` gives for a stored head that a tied config ignores, comparing the
    two tables block by block (never both whole in memory)."""
    if not config.tied_head or HEAD_NAME not in files:
        return
    import torch

    with _open(files[EMBED_NAME]) as f, _open(files[HEAD_NAME]) as g:
        same = f.get_slice(EMBED_NAME).get_shape() == g.get_slice(HEAD_NAME).get_shape()
    pairs = zip(read_rows(files[EMBED_NAME], EMBED_NAME), read_rows(files[HEAD_NAME], HEAD_NAME))
    if not (same and all(torch.equal(a, b) for a, b in pairs)):
        _warn_untied(checkpoint)


def _warn_untied(checkpoint: Path) -> None:
    warnings.warn(
        f"{checkpoint}: tie_word_embeddings is true but {HEAD_NAME} differs from embed_tokens; "
        "using embed_tokens, as transformers does",
        stacklevel=3,
    )


def _resolve_head(config: ModelConfig, tensors: dict, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A tied head is embed_tokens, whatever else is stored (transformers ties them at load)."""
    import torch

    if not config.tied_head:
        return tensors
    embed = tensors[EMBED_NAME]
    stored = tensors.get(HEAD_NAME)
    if stored is not None and (stored.shape != embed.shape or not torch.equal(stored, embed)):
        _warn_untied(checkpoint)
    tensors[HEAD_NAME] = embed
    return tensors
