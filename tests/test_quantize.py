"""int8 / int4 weight-only bundles: sizes, the tied table stored once, contracts kept, they transcribe."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from qasr.cli import main
from qasr.export.quantize import quantize_bundle
from qasr.runtime.bundle import Bundle
from support import DATA

EN = str(DATA / "en_16k_s16.wav")
RATIO = {"int8": 0.55, "int4": 0.35}  # the bounds on decoder data against fp32


@pytest.fixture(scope="module")
def quantized(bundle, tmp_path_factory):
    """quantized(weights, preset="tiny") -> that fp32 bundle quantized (cached)."""
    made: dict = {}

    def get(weights: str, preset: str = "tiny", encoder_weights: str = "fp32"):
        key = (weights, preset, encoder_weights)
        if key not in made:
            out = tmp_path_factory.mktemp(f"q-{preset}-{weights}-{encoder_weights}") / "bundle"
            made[key] = quantize_bundle(bundle(preset), out, weights, encoder_weights, progress=lambda line: None)
        return made[key]

    return get


def _data_bytes(bundle: Path, graph: str) -> int:
    return (bundle / f"{graph}.onnx.data").stat().st_size


def _weight_ops(path: Path) -> dict[str, int]:
    """Ops that read a 2-D weight initializer, by type."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer if len(t.dims) >= 2}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if any(name in weights for name in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_decoder_data_shrinks(bundle, quantized, weights):
    """The tiny preset's decoder is mostly its 151936-row tied table, as the released 0.6B's head is its
    largest matrix: the ratio measures the table and the projections together."""
    ratio = _data_bytes(quantized(weights), "decoder") / _data_bytes(bundle("tiny"), "decoder")
    assert ratio <= RATIO[weights], ratio
    assert _data_bytes(quantized(weights), "encoder") == _data_bytes(bundle("tiny"), "encoder")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_every_weight_is_quantized_and_the_table_stored_once(quantized, weights):
    path = quantized(weights) / "decoder.onnx"
    assert set(_weight_ops(path)) == {"MatMulNBits", "GatherBlockQuantized"}
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and
                next(a.i for a in n.attribute if a.name == "N") == 151936)
    region = [(e.key, e.value) for e in inits[gather.input[0]].external_data]
    assert region == [(e.key, e.value) for e in inits[head.input[1]].external_data]
    assert gather.input[2] == head.input[2]  # the scales, shared outright


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_wide_head_is_split_over_views_of_the_same_bytes(quantized, tmp_path, speech, weights):
    """What the 1.7B's 155 MB int4 head gets (its load no longer holds it twice), forced here on the
    tiny head by a small part size: parts that tile the head's bytes, nothing stored again, and the
    same logits to the bit, since each output column is the same dot product."""
    from qasr.export.quantize import split_wide_matmuls
    from qasr.runtime.batch import greedy_decode
    from qasr.runtime.prompt import prompt_ids
    from qasr.runtime.transcribe import Transcriber

    whole = quantized(weights)
    split = tmp_path / "split"
    shutil.copytree(whole, split)
    model = onnx.load(str(split / "decoder.onnx"), load_external_data=False)
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and
                next(a.i for a in n.attribute if a.name == "N") == 151936)
    region = {e.key: e.value for e in next(t for t in model.graph.initializer if t.name == head.input[1]).external_data}
    split_wide_matmuls(model, part_bytes=int(region["length"]) // 3)
    onnx.save_model(model, str(split / "decoder.onnx"))

    model = onnx.load(str(split / "decoder.onnx"), load_external_data=False)
    parts = [n for n in model.graph.node if n.name.startswith(f"{head.name}/rows")]
    assert len(parts) == 3 and sum(next(a.i for a in n.attribute if a.name == "N") for n in parts) == 151936
    inits = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}
    offset = int(region["offset"])
    for part in parts:
        view = inits[part.input[1]]
        assert int(view["offset"]) == offset and view["location"] == region["location"]
        offset += int(view["length"])
    assert offset == int(region["offset"]) + int(region["length"])
    assert (split / "decoder.onnx.data").stat().st_size == (whole / "decoder.onnx.data").stat().st_size

    runs = []
    for path in (whole, split):
        asr = Transcriber.load(path, backend="onnxruntime")
        embeds = asr.encode(speech(3), 16000)
        prompt = prompt_ids(asr.tokenizer, "", None, len(embeds))
        runs.append(greedy_decode(asr.backend, prompt, embeds, asr.audio_token, 4, (), keep_logits=True))
    assert runs[0].tokens == runs[1].tokens
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].logits, runs[1].logits))


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_manifest_records_the_scheme_and_keeps_contracts(bundle, quantized, weights):
    fp32, q = Bundle.load(bundle("tiny")).manifest, Bundle.load(quantized(weights)).manifest
    assert q["precision"] == weights and q["reference"] == str(Path(bundle("tiny")).resolve())
    assert q["quantizer"]["name"] == "onnxruntime.quantization.matmul_nbits_quantizer"
    settings = q["weights"]["decoder"]
    assert settings["bits"] == int(weights[3:]) and settings["tied_table_stored_once"]
    assert {"block_size", "symmetric", "accuracy_level"} <= set(settings)
    assert "encoder" not in q["weights"]
    for name, entry in fp32["graphs"].items():
        assert (q["graphs"][name]["inputs"], q["graphs"][name]["outputs"]) == (entry["inputs"], entry["outputs"])


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_bundle_transcribes(bundle, quantized, weights):
    from qasr.runtime.transcribe import Transcriber

    fp32 = Transcriber.load(bundle("tiny"), backend="onnxruntime").transcribe(EN, max_new_tokens=8)
    result = Transcriber.load(quantized(weights), backend="onnxruntime").transcribe(EN, max_new_tokens=8)
    assert len(result.token_ids) == 8 or not result.truncated
    if weights == "int8":  # 8 bits keeps the tiny model's first greedy tokens
        assert result.token_ids[:4] == fp32.token_ids[:4]


def test_int8_logits_follow_fp32(bundle, quantized, speech):
    from qasr.runtime.batch import greedy_decode
    from qasr.runtime.prompt import prompt_ids
    from qasr.runtime.transcribe import Transcriber

    runs = []
    for path in (bundle("tiny"), quantized("int8")):
        model = Transcriber.load(path, backend="onnxruntime")
        embeds = model.encode(speech(3), 16000)
        prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
        runs.append(greedy_decode(model.backend, prompt, embeds, model.audio_token, 1, (), keep_logits=True))
    a, b = runs[0].logits[0], runs[1].logits[0]
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_aligner_bundle_quantizes_and_aligns(bundle, quantized):
    from qasr.runtime.align import Aligner

    path = quantized("int4", "tiny-aligner", encoder_weights="int8")
    manifest = Bundle.load(path).manifest
    assert set(manifest["weights"]) == {"encoder", "projector", "aligner"}
    assert manifest["weights"]["encoder"]["bits"] == 8
    assert set(_weight_ops(path / "aligner.onnx")) == {"MatMulNBits", "GatherBlockQuantized"}
    assert "MatMulNBits" in _weight_ops(path / "encoder.onnx")
    words = Aligner.load(path, backend="onnxruntime").align(EN, "hello there world", "English")
    assert [w.text for w in words] == ["hello", "there", "world"]


def test_cli_export_from_checkpoint_and_transcribe(capsys, checkpoint, tmp_path):
    out = tmp_path / "int4"
    assert main(["export", str(checkpoint("tiny")), "--out", str(out), "--weights", "int4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["reference"] is None  # no fp32 bundle kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    capsys.readouterr()
    assert main(["transcribe", EN, "--model", str(out), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("argv, needle", [
    (["--weights", "int8"], "already quantized"),
    (["--weights", "fp32"], "nothing to quantize"),
    (["--weights", "int4", "--over"], "not over it"),
])
def test_bad_requests_are_one_line(capsys, quantized, bundle, tmp_path, argv, needle):
    source = quantized("int8") if needle == "already quantized" else bundle("tiny")
    out = source if "--over" in argv else tmp_path / "x"
    assert main(["export", str(source), "--out", str(out), *[a for a in argv if a != "--over"]]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qasr: error: ")]
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "x").exists() and Bundle.load(source).manifest["precision"] == (
        "int8" if needle == "already quantized" else "fp32")


def test_quantizer_import_leaves_logging_alone(bundle, tmp_path):
    """ONNX Runtime's quantizer module calls logging.basicConfig(level=INFO) on import."""
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    quantize_bundle(bundle("tiny"), tmp_path / "q", "int4", progress=lambda line: None)
    assert (root.level, list(root.handlers)) == before


def test_prepacked_copies_load_and_match(capsys, bundle, tmp_path):
    """`--prepack` saves each graph optimised with its weights packed; the backend opens those copies
    here (same ids and logits as the portable graphs) and ignores them once the record is not this machine's."""
    from qasr.runtime.backends.prepack import prepacked_graph
    from qasr.runtime.bundle import PREPACKED, PREPACKED_RECORD
    from qasr.runtime.transcribe import Transcriber

    out = tmp_path / "int4"
    assert main(["export", str(bundle("tiny")), "--out", str(out), "--weights", "int4", "--prepack"]) == 0
    loaded = Bundle.load(out)
    assert all(prepacked_graph(loaded, name) for name in loaded.manifest["graphs"])
    plain = Transcriber.load(quantize_bundle(bundle("tiny"), tmp_path / "plain", "int4", progress=lambda line: None),
                             backend="onnxruntime").transcribe(EN, max_new_tokens=6)
    model = Transcriber.load(out, backend="onnxruntime")
    packed = model.transcribe(EN, max_new_tokens=6)
    assert packed.token_ids == plain.token_ids
    assert model.backend.sessions["decoder"]._model_path == str(out / PREPACKED / "decoder.onnx")
    assert not model.backend.sessions["encoder"].get_session_options().enable_cpu_mem_arena
    record = out / PREPACKED / PREPACKED_RECORD
    stale = json.loads(record.read_text())
    stale["machine"]["onnxruntime"] = "0.0"
    record.write_text(json.dumps(stale))
    assert prepacked_graph(Bundle.load(out), "decoder") is None


def test_graphs_run_once_per_clip_free_their_memory_and_decode_the_same(quantized):
    """On the CPU the encoder and projector run without ONNX Runtime's arena and the decoder with it,
    shrunk after each prefill (qasr.runtime.backends.onnxruntime_cpu). A second transcription, after
    the shrink, gives the ids of the first, and so does a decoder whose arena is never shrunk."""
    from qasr.runtime.transcribe import Transcriber

    model = Transcriber.load(quantized("int4"), backend="onnxruntime")
    arenas = {name: model.backend.sessions[name].get_session_options().enable_cpu_mem_arena
              for name in ("encoder", "projector", "decoder")}
    assert arenas == {"encoder": False, "projector": False, "decoder": True}
    first, again = (model.transcribe(EN, max_new_tokens=6).token_ids for _ in range(2))
    model.backend.shrink = None
    assert first == again == model.transcribe(EN, max_new_tokens=6).token_ids


def test_tensorrt_build_of_a_quantized_bundle_is_one_line(capsys, quantized, bundle):
    code = main(["build", str(quantized("int4")), "--graphs-only"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qasr: error: ")]
    assert code == 1 and len(lines) == 1 and f"qasr build {Path(bundle('tiny')).resolve()}" in lines[0]


def test_tensorrt_int4_graphs_are_in_the_operator_table_and_run(bundle, tmp_path):
    """`qasr build --weights int4` derives DequantizeLinear(int4, axis 0, block) -> MatMul for every decoder
    weight (written, type-checked and checked against onnx-tensorrt's table; no TensorRT ran here). The
    fp32 flavour of the same graph runs on ONNX Runtime's CPU, close to the fp32 decoder."""
    import shutil

    import onnxruntime as ort
    from onnx import TensorProto

    from qasr.export.precision import derive_bundle

    source = tmp_path / "fp32"
    shutil.copytree(bundle("tiny"), source)
    loaded = Bundle.load(source)
    table = json.loads((Path(__file__).parent.parent / "qasr" / "export" / "trt_operators.json").read_text())
    supported = {op: {t.strip() for t in types.split(",")} for op, types in
                 table["tables"]["10.15"]["operators"].items()}
    kinds = {TensorProto.INT4: "INT4", TensorProto.BFLOAT16: "BF16", TensorProto.FLOAT: "FP32"}
    for precision in ("bf16", "fp32"):
        derived = derive_bundle(loaded, precision, progress=lambda line: None, weights="int4")
        model = onnx.load(str(derived / "decoder.onnx"), load_external_data=False)
        assert model.opset_import[0].version == 21 <= table["tables"]["10.15"]["max_opset"]
        assert table["tables"]["10.3"]["max_opset"] < 21  # hence: not for JetPack 6's TensorRT 10.3
        inits = {t.name: t for t in model.graph.initializer}
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 15 and "Gemm" not in {n.op_type for n in model.graph.node}
        for node in dq:
            assert inits[node.input[0]].data_type == TensorProto.INT4 and len(node.input) == 2  # symmetric
            assert kinds[inits[node.input[0]].data_type] in supported["DequantizeLinear"]
            assert kinds[inits[node.input[1]].data_type] == precision.upper()
    session = {name: ort.InferenceSession(str(path)) for name, path in
               (("fp32", source / "decoder.onnx"), ("int4", derived / "decoder.onnx"))}
    t = loaded.model["text"]
    feeds = {"input_ids": np.array([[151644, 8948, 198, 151645, 198]], dtype=np.int64),
             "audio_embeds": np.zeros((1, 1, t["hidden_size"]), dtype=np.float32),
             "position": np.zeros(1, dtype=np.int64), "cache_start": np.zeros(1, dtype=np.int64),
             **{f"past_{kind}_{layer}": np.zeros((1, t["num_key_value_heads"], 0, t["head_dim"]), dtype=np.float32)
                for layer in range(t["num_hidden_layers"]) for kind in ("key", "value")}}
    a, b = (session[name].run(["logits"], feeds)[0][0] for name in ("fp32", "int4"))
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.8
