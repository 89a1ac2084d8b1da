"""torch -> ONNX: the canonical fp32 bundle of a checkpoint.

Graphs (contracts in docs/graphs.md): encoder, projector, and decoder for ASR checkpoints or
aligner for the forced aligner. Opset 20, so TensorRT 10.3 (JetPack 6) parses them. Weights go
to one external data file per graph; a tied head is the embedding initializer itself, stored once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from qasr.cache import writable_dir
from qasr.errors import CheckpointError
from qasr.export.fused_decoder import build_fused_decoder, check_fusable
from qasr.export.onnx_files import alias_shared_weights, graph_contract
from qasr.export.quantize import SCHEMES, check_weights, quantize_graph, quantized_manifest
from qasr.export.trace import StandIn
from qasr.export.weight_stream import DataFile, StreamedGraph
from qasr.memory import return_freed_memory
from qasr.models.checkpoint import check_checkpoint, warn_if_head_untied
from qasr.models.config import ModelConfig, load_config
from qasr.models.digest import checkpoint_digest
from qasr.models.thinker import EOS_IDS
from qasr.runtime.bundle import AUDIO_GRAPHS, FORMAT, FORMAT_VERSION, MANIFEST, cache_names, staged
from qasr.runtime.tokenizer import SOURCE_FILES, TOKENIZER_FILE, Tokenizer
from qasr.version import __version__

OPSET = 20


def export_bundle(checkpoint: str | Path, out_dir: str | Path, progress=print, weights: str = "fp32",
                  encoder_weights: str = "fp32", decoder: str = "traced") -> Path:
    """Export a local checkpoint directory to a bundle directory, in memory bounded by its largest tensor.

    Graphs are traced over stand-in weights and written one weight at a time from the checkpoint
    (qasr.export.trace). int8/int4 `weights` (and `encoder_weights`) quantize each graph as it is
    written (qasr.export.quantize), so no fp32 copy of a quantized graph is ever written. The
    bundle is staged beside `out_dir` and moved into place only when complete, so a failed or
    interrupted export never leaves a half bundle or damages an existing one. `decoder="fused"`
    writes the ASR decoder as the fused graph (qasr.export.fused_decoder) instead of tracing it.
    """
    checkpoint, out = Path(checkpoint), Path(out_dir)
    writable_dir(out.parent, "the bundle's parent directory")  # before minutes of work, not after
    quantized = weights != "fp32" or encoder_weights != "fp32"
    if quantized:
        check_weights(weights, encoder_weights)  # before minutes of export, not after
    return_freed_memory()
    config = load_config(checkpoint)
    if decoder == "fused" and not config.is_aligner:
        check_fusable(config)  # before minutes of export, not after
    files = check_checkpoint(checkpoint, config)
    warn_if_head_untied(checkpoint, config, files)
    progress(f"reading {checkpoint}")
    stand_in = StandIn(config, files)
    graphs = {"encoder": export_encoder, "projector": export_projector}
    graphs.update({"aligner": export_aligner} if config.is_aligner else {"decoder": export_decoder})
    contracts, settings = {}, {}
    with staged(out) as staging:
        for name, export in graphs.items():
            progress(f"exporting {name}")
            precision = encoder_weights if name in AUDIO_GRAPHS else weights
            if name == "decoder" and decoder == "fused":
                contracts[name], setting = export_fused(checkpoint, staging / f"{name}.onnx", precision, progress)
                settings.update({name: setting} if setting is not None else {})
                continue
            graph = export(stand_in, staging / f"{name}.onnx")
            if precision == "fp32":
                contracts[name] = write_graph(graph, staging / f"{name}.onnx")
            else:
                progress(f"quantizing {name} to {precision}")
                contracts[name], settings[name] = quantize_graph(graph, staging / f"{name}.onnx", SCHEMES[precision])
        copy_tokenizer(checkpoint, staging)
        manifest = build_manifest(config, contracts, checkpoint)
        if quantized:
            manifest = quantized_manifest(manifest, weights, settings, reference=None)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def export_fused(checkpoint: Path, path: Path, precision: str,
                 progress: Callable[[str], None] = print) -> tuple[dict, dict | None]:
    """The fused decoder, built from the checkpoint's tensors (no tracing); for int8/int4 built
    beside the bundle first, then quantized weight by weight like a traced graph. Its contract keeps
    the cache layout it was built with."""
    if precision == "fp32":
        return build_fused_decoder(checkpoint, path), None
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = build_fused_decoder(checkpoint, Path(tmp) / path.name)
        progress(f"quantizing decoder to {precision}")
        contract, setting = quantize_graph(StreamedGraph.from_file(Path(tmp) / path.name), path, SCHEMES[precision])
    return {**contract, "layout": built["layout"], "qk_norm": built["qk_norm"]}, setting


def export_encoder(stand_in: StandIn, path: Path) -> StreamedGraph:
    a = stand_in.model.config.audio
    args = (torch.zeros(2, a.num_mel_bins, a.window_frames), torch.tensor([a.window_frames, 130]),
            torch.tensor([a.window_frames, a.window_frames]))
    return _export(stand_in, stand_in.model.encoder, args, path, ["mel", "frames", "conv_frames"], ["hidden"],
                   {"mel": {0: "windows", 2: "frames"}, "frames": {0: "windows"}, "conv_frames": {0: "windows"},
                    "hidden": {0: "windows", 1: "tokens"}})


def export_projector(stand_in: StandIn, path: Path) -> StreamedGraph:
    args = (torch.zeros(7, stand_in.model.config.audio.d_model),)
    return _export(stand_in, stand_in.model.projector, args, path, ["hidden"], ["audio_embeds"],
                   {"hidden": {0: "tokens"}, "audio_embeds": {0: "tokens"}})


def export_decoder(stand_in: StandIn, path: Path) -> StreamedGraph:
    """Traced with two rows, so that nothing is specialised to one: a decode step runs B rows on
    one shared cache [1, kvh, P, hd], each at its own position in its own region (cache_start)."""
    model = stand_in.model
    t = model.config.text
    ids = torch.tensor([[151644, model.config.audio_token_id, model.config.audio_token_id, 198]] * 2)
    past = [torch.zeros(1, t.num_key_value_heads, 8, t.head_dim) for _ in range(2 * t.num_hidden_layers)]
    names = cache_names(t.num_hidden_layers)
    dims = {"input_ids": {0: "batch", 1: "new"}, "audio_embeds": {0: "batch", 1: "audio"},
            "position": {0: "batch"}, "cache_start": {0: "batch"}, "next_token": {0: "batch"},
            "logits": {0: "batch"}, "new_kv": {0: "batch", 4: "new"}, **{name: {2: "capacity"} for name in names}}
    args = (ids, torch.zeros(2, 2, t.hidden_size), torch.tensor([2, 1]), torch.tensor([0, 4]), *past)
    return _export(stand_in, model.lm(), args, path, ["input_ids", "audio_embeds", "position", "cache_start", *names],
                   ["next_token", "logits", "new_kv"], dims)


def export_aligner(stand_in: StandIn, path: Path) -> StreamedGraph:
    model = stand_in.model
    stamp = model.config.timestamp_token_id
    ids = torch.tensor([[model.config.audio_start_token_id, model.config.audio_token_id,
                         model.config.audio_token_id, model.config.audio_end_token_id, 100, stamp, stamp]])
    args = (ids, torch.zeros(1, 2, model.config.text.hidden_size))
    dims = {"input_ids": {1: "sequence"}, "audio_embeds": {1: "audio"}, "classes": {0: "slots"},
            "logits": {0: "slots"}}
    return _export(stand_in, model.aligner(), args, path, ["input_ids", "audio_embeds"], ["classes", "logits"], dims)


def _export(stand_in: StandIn, module, args, path: Path, inputs, outputs, dims) -> StreamedGraph:
    """Trace `module` to ONNX: its structure, with a checkpoint reader for each weight."""
    views: dict = {}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, torch.no_grad(), stand_in.recording(views):
        raw = Path(tmp) / path.name
        torch.onnx.export(module.eval(), args, str(raw), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=dims,
                          do_constant_folding=True)
        graph = onnx.load(str(raw))
    return stand_in.streamed(graph, module, views)


def write_graph(graph: StreamedGraph, path: Path) -> dict:
    """Store a streamed graph as graph + one external data file; return its contract."""
    data = path.with_name(path.name + ".data")
    with DataFile(data) as out:
        graph.save(path, out)
    if not data.stat().st_size:
        data.unlink()
    alias_shared_weights(path)
    onnx.checker.check_model(str(path))
    return {"file": path.name, "data": [data.name] if data.exists() else [], **graph_contract(graph.model)}


def copy_tokenizer(checkpoint: Path, out: Path) -> None:
    """The official tokenizer files, plus one tokenizer.json the runtime loads directly."""
    for name in SOURCE_FILES:
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"{checkpoint / name}: missing (the bundle needs the tokenizer)")
        shutil.copyfile(checkpoint / name, out / name)
    Tokenizer.from_dir(checkpoint).save(out / TOKENIZER_FILE)


def build_manifest(config: ModelConfig, contracts: dict, checkpoint: Path) -> dict:
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qasr_version": __version__,
        "kind": "aligner" if config.is_aligner else "asr",
        "precision": "fp32",
        "opset": OPSET,
        "model": config.to_dict(),
        "languages": list(config.support_languages),
        "tokens": {
            "audio": config.audio_token_id, "audio_start": config.audio_start_token_id,
            "audio_end": config.audio_end_token_id, "eos": list(EOS_IDS),
        },
        "audio": {"sample_rate": 16000, "hop": 160, "mel_bins": config.audio.num_mel_bins,
                  "window_frames": config.audio.window_frames, "window_tokens": config.audio.window_tokens},
        "graphs": contracts,
        "source": {"checkpoint": checkpoint.name, "sha256": checkpoint_digest(checkpoint)},
    }
    if config.is_aligner:
        manifest["tokens"]["timestamp"] = config.timestamp_token_id
        manifest["aligner"] = {"classes": config.classify_num, "segment_ms": config.timestamp_segment_time}
    return manifest
