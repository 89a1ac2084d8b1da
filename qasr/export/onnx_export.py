"""torch -> ONNX: the canonical fp32 bundle of a checkpoint.

Graphs (contracts in docs/graphs.md): encoder, projector, and decoder for ASR checkpoints or
aligner for the forced aligner. Opset 20, so TensorRT 10.3 (JetPack 6) parses them. Weights go
to one external data file per graph; a tied head is the embedding initializer itself, stored once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import onnx
import torch

from qasr import __version__
from qasr.errors import CheckpointError
from qasr.export.onnx_files import DATA_THRESHOLD, alias_shared_weights, graph_contract
from qasr.models.config import ModelConfig, load_config
from qasr.models.thinker import EOS_IDS, Thinker
from qasr.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, cache_names
from qasr.runtime.resolve import checkpoint_digest, writable_dir
from qasr.runtime.tokenizer import SOURCE_FILES, TOKENIZER_FILE, Tokenizer

OPSET = 20


def export_bundle(checkpoint: str | Path, out_dir: str | Path, progress=print, weights: str = "fp32",
                  encoder_weights: str = "fp32", decoder: str = "traced") -> Path:
    """Export a local checkpoint directory to a bundle directory.

    The bundle is written beside `out_dir` and moved into place only when complete, so a failed
    or interrupted export never leaves a half bundle or damages an existing one. int8/int4
    `weights` (and `encoder_weights`) are a post-pass over the fp32 export (qasr.export.quantize),
    whose fp32 graphs are dropped once quantized. `decoder="fused"` writes the ASR decoder as the
    fused graph (qasr.export.fused_decoder) instead of tracing it.
    """
    checkpoint, out = Path(checkpoint), Path(out_dir)
    writable_dir(out.parent, "the bundle's parent directory")  # before minutes of work, not after
    if weights != "fp32" or encoder_weights != "fp32":
        from qasr.export.quantize import check_weights, quantize_bundle

        check_weights(weights, encoder_weights)  # before minutes of export, not after
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.fp32.") as tmp:
            fp32 = export_bundle(checkpoint, Path(tmp) / "fp32", progress, decoder=decoder)
            return quantize_bundle(fp32, out, weights, encoder_weights, progress, reference=False)
    progress(f"loading {checkpoint}")
    model = Thinker.from_pretrained(checkpoint)
    config = model.config
    graphs = {"encoder": export_encoder, "projector": export_projector}
    graphs.update({"aligner": export_aligner} if config.is_aligner else {"decoder": decoder_exporter(checkpoint, decoder)})
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp)
        contracts = {}
        for name, export in graphs.items():
            progress(f"exporting {name}")
            contracts[name] = export(model, staging / f"{name}.onnx")
        copy_tokenizer(checkpoint, staging)
        manifest = build_manifest(config, contracts, checkpoint)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        staging.chmod(0o755)  # TemporaryDirectory makes it private; a bundle is an ordinary directory
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        staging.mkdir()  # TemporaryDirectory removes its (now empty) directory on exit
    return out


def decoder_exporter(checkpoint: Path, decoder: str):
    """The traced decoder, or the fused one built from the checkpoint's tensors."""
    if decoder == "traced":
        return export_decoder
    from qasr.export.fused_decoder import build_fused_decoder, check_fusable

    check_fusable(load_config(checkpoint))
    return lambda model, path: build_fused_decoder(checkpoint, path)


def export_encoder(model: Thinker, path: Path) -> dict:
    a = model.config.audio
    args = (torch.zeros(2, a.num_mel_bins, a.window_frames), torch.tensor([a.window_frames, 130]),
            torch.tensor([a.window_frames, a.window_frames]))
    return _export(model.encoder, args, path, ["mel", "frames", "conv_frames"], ["hidden"],
                   {"mel": {0: "windows", 2: "frames"}, "frames": {0: "windows"}, "conv_frames": {0: "windows"},
                    "hidden": {0: "windows", 1: "tokens"}})


def export_projector(model: Thinker, path: Path) -> dict:
    args = (torch.zeros(7, model.config.audio.d_model),)
    return _export(model.projector, args, path, ["hidden"], ["audio_embeds"],
                   {"hidden": {0: "tokens"}, "audio_embeds": {0: "tokens"}})


def export_decoder(model: Thinker, path: Path) -> dict:
    """Traced with two rows, so that nothing is specialised to one: a decode step runs B rows on
    one shared cache [1, kvh, P, hd], each at its own position in its own region (cache_start)."""
    t = model.config.text
    ids = torch.tensor([[151644, model.config.audio_token_id, model.config.audio_token_id, 198]] * 2)
    past = [torch.zeros(1, t.num_key_value_heads, 8, t.head_dim) for _ in range(2 * t.num_hidden_layers)]
    names = cache_names(t.num_hidden_layers)
    dims = {"input_ids": {0: "batch", 1: "new"}, "audio_embeds": {0: "batch", 1: "audio"},
            "position": {0: "batch"}, "cache_start": {0: "batch"}, "next_token": {0: "batch"},
            "logits": {0: "batch"}, "new_kv": {0: "batch", 4: "new"}, **{name: {2: "capacity"} for name in names}}
    args = (ids, torch.zeros(2, 2, t.hidden_size), torch.tensor([2, 1]), torch.tensor([0, 4]), *past)
    return _export(model.lm(), args, path, ["input_ids", "audio_embeds", "position", "cache_start", *names],
                   ["next_token", "logits", "new_kv"], dims)


def export_aligner(model: Thinker, path: Path) -> dict:
    stamp = model.config.timestamp_token_id
    ids = torch.tensor([[model.config.audio_start_token_id, model.config.audio_token_id,
                         model.config.audio_token_id, model.config.audio_end_token_id, 100, stamp, stamp]])
    args = (ids, torch.zeros(1, 2, model.config.text.hidden_size))
    dims = {"input_ids": {1: "sequence"}, "audio_embeds": {1: "audio"}, "classes": {0: "slots"},
            "logits": {0: "slots"}}
    return _export(model.aligner(), args, path, ["input_ids", "audio_embeds"], ["classes", "logits"], dims)


def _export(module, args, path: Path, inputs, outputs, dims) -> dict:
    """Trace `module` to ONNX, then store it as graph + one external data file; return its contract."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, torch.no_grad():
        raw = Path(tmp) / path.name
        torch.onnx.export(module.eval(), args, str(raw), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=dims,
                          do_constant_folding=True)
        graph = onnx.load(str(raw))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=DATA_THRESHOLD)
    alias_shared_weights(path)
    onnx.checker.check_model(str(path))
    return {"file": path.name, "data": [data.name] if data.exists() else [], **graph_contract(graph)}


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
