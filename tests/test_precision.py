"""The derived bf16 / fp16 graphs (qasr.export.precision): valid ONNX, parseable by TensorRT, typed
as intended, and (fp16, which ONNX Runtime CPU can run) numerically close to the fp32 graphs.

bf16 cannot run on ONNX Runtime CPU (no bf16 MatMul), so it is checked structurally here and
numerically only through the torch reference (scripts/bench_bf16.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from oracle import relative_error
from qasr.export.precision import FP16_CLAMP, convert_tensor, derive_bundle, is_cache
from qasr.runtime.bundle import Bundle
from qasr.runtime.batch import greedy_decode
from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend
from qasr.runtime.bundle import derived_dir
from qasr.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend, derived_graphs
from qasr.runtime.windows import join_windows, split_windows

TABLE = json.loads((Path(__file__).parent.parent / "qasr" / "export" / "trt_operators.json").read_text())
FLOATS = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16"}
TRT_TYPES = {**FLOATS, TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
             TensorProto.UINT8: "UINT8"}
LOW = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16}
PRESETS = ["tiny", "tiny-mqa", "tiny-aligner"]
PROMPT_HEAD = [151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669]
PROMPT_TAIL = [151670, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def derived(bundle):
    """derived(preset, precision) -> the bundle, with BUNDLE/derived/<precision> written."""
    def get(preset: str, precision: str) -> Bundle:
        loaded = Bundle.load(bundle(preset))
        derive_bundle(loaded, precision, progress=lambda line: None)
        return loaded

    return get


def graphs(bundle: Bundle, precision: str):
    for name, entry in derived_graphs(bundle, precision).items():
        path = derived_dir(bundle, precision) / entry["file"]
        yield name, path, onnx.load(str(path), load_external_data=False)


def types_of(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            types[n.output[0]] = n.attribute[0].t.data_type
    return types


def data_types(node: onnx.NodeProto, types: dict[str, int]) -> set[int]:
    """The types onnx-tensorrt's 'Supported Types' column speaks of: the data input(s), not indices."""
    if node.op_type in ("Constant", "ConstantOfShape"):
        return {types[node.output[0]]}
    if node.op_type == "Cast":
        return {types[node.input[0]], types[node.output[0]]}
    if node.op_type == "Where":
        return {types[node.input[1]]}
    return {types[node.input[0]]}


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("preset", PRESETS)
def test_checker_and_strict_shape_inference(derived, preset, precision):
    bundle = derived(preset, precision)
    for _, path, model in graphs(bundle, precision):
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        assert model.opset_import[0].version == 20


@pytest.mark.parametrize("version", sorted(TABLE["tables"]))
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_node_is_in_the_tensorrt_operator_table(derived, preset, precision, version):
    """Each op, and the data type it runs on, is documented as supported by onnx-tensorrt."""
    table = TABLE["tables"][version]
    supported = {op: {t.strip() for t in types.split(",")} for op, types in table["operators"].items()}
    bundle = derived(preset, precision)
    missing = set()
    for name, _, model in graphs(bundle, precision):
        assert model.opset_import[0].version <= table["max_opset"]
        types = types_of(model)
        for node in model.graph.node:
            if node.op_type not in supported:
                missing.add(f"{name}: {node.op_type}")
                continue
            for kind in data_types(node, types):
                if TRT_TYPES.get(kind) not in supported[node.op_type]:
                    missing.add(f"{name}: {node.op_type} on {helper.tensor_dtype_to_string(kind)}")
    assert not missing, sorted(missing)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_policy(derived, precision):
    """Low precision for weights and matmuls, fp32 for statistics, softmax, angles and logits."""
    low = LOW[precision]
    bundle = derived("tiny", precision)
    for name, _, model in graphs(bundle, precision):
        types = types_of(model)
        ops = {}
        for node in model.graph.node:
            ops.setdefault(node.op_type, set()).update(data_types(node, types))
        for op in ("MatMul", "Gemm", "Gather", "GatherElements", "Where"):
            assert ops.get(op, {low}) <= {low, TensorProto.INT64, TensorProto.BOOL}, (name, op)
        for op in ("Softmax", "ReduceMean", "Pow", "Sqrt", "LayerNormalization", "ArgMax", "Cos", "Sin"):
            assert ops.get(op, {TensorProto.FLOAT}) == {TensorProto.FLOAT}, (name, op)
        conv = TensorProto.FLOAT if precision == "bf16" else low  # Conv-20 has no bf16 in ONNX
        assert ops.get("Conv", {conv}) == {conv}, name
        for value in [*model.graph.input, *model.graph.output]:
            kind = value.type.tensor_type.elem_type
            if kind in FLOATS:
                assert kind == (low if is_cache(value.name) else TensorProto.FLOAT), (name, value.name)
        weights = [t for t in model.graph.initializer if len(t.dims) == 2]
        assert weights and all(t.data_type == low for t in weights), name
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute[0].t.data_type in FLOATS:
                assert np.isfinite(numpy_helper.to_array(node.attribute[0].t).astype(np.float32)).all()


def test_fp16_keeps_the_residual_stream_in_fp32_and_clamps_each_encoder_layer(derived):
    bundle = derived("tiny", "fp16")
    models = {name: model for name, _, model in graphs(bundle, "fp16")}
    types = types_of(models["encoder"])
    clips = [n for n in models["encoder"].graph.node if n.op_type == "Clip" and types[n.input[0]] == TensorProto.FLOAT]
    bounds = {float(numpy_helper.to_array(t)) for t in models["encoder"].graph.initializer
              if t.name in {i for c in clips for i in c.input[1:]}}
    assert len(clips) == bundle.model["audio"]["encoder_layers"] and bounds == {-FP16_CLAMP, FP16_CLAMP}
    for name in ("encoder", "decoder"):
        types = types_of(models[name])
        normed = {n.input[0] for n in models[name].graph.node if n.op_type in ("LayerNormalization", "Pow")}
        assert normed and all(types[t] == TensorProto.FLOAT for t in normed), name


def test_bf16_weights_round_to_nearest_even_like_torch():
    values = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 3
    values[:4] = [1 + 2**-8, 1 + 3 * 2**-8, -65504, 2**-130]  # ties to even, the mask value, a subnormal
    tensor = convert_tensor(numpy_helper.from_array(values, "w"), TensorProto.BFLOAT16, "test")
    ours = np.frombuffer(tensor.raw_data, dtype=np.uint16)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert tensor.data_type == TensorProto.BFLOAT16 and np.array_equal(ours, theirs)


def test_derived_graphs_are_reused_and_rederived_when_stale(derived):
    bundle = derived("tiny", "bf16")
    record = derived_dir(bundle, "bf16") / "graphs.json"
    stamp = record.stat().st_mtime_ns
    derive_bundle(bundle, "bf16", progress=lambda line: None)
    assert record.stat().st_mtime_ns == stamp
    stale = json.loads(record.read_text())
    stale["source_sha256"] = "0" * 64
    record.write_text(json.dumps(stale))
    with pytest.raises(Exception, match="--graphs-only"):
        derived_graphs(bundle, "bf16")
    derive_bundle(bundle, "bf16", progress=lambda line: None)
    assert derived_graphs(bundle, "bf16")["decoder"]["inputs"]["past_value_1"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("preset", ["tiny", "tiny-mqa"])
def test_fp16_graphs_match_fp32_on_onnxruntime_cpu(derived, speech, preset):
    """The fp16 graphs, driven by the device-binding backend on the CPU, against the fp32 graphs."""
    from qasr.kernels.fbank import log_mel

    bundle = derived(preset, "fp16")
    reference, candidate = OnnxRuntimeBackend(bundle), OnnxRuntimeCudaBackend(bundle, precision="fp16", device="cpu")
    windows, frames, conv = split_windows(log_mel(speech(9.5)), bundle.manifest["audio"]["window_frames"])
    hidden = reference.encode(windows, frames, conv)
    low = candidate.encode(windows, frames, conv)
    assert relative_error(join_windows(low, frames), join_windows(hidden, frames)) < 1e-2
    embeds = reference.project(join_windows(hidden, frames))
    assert relative_error(candidate.project(join_windows(hidden, frames)), embeds) < 1e-2
    prompt = PROMPT_HEAD + [151676] * len(embeds) + PROMPT_TAIL
    expected = greedy_decode(reference, prompt, embeds, 151676, 16, (151645, 151643), keep_logits=True,
                             prefill_chunk=64)
    got = greedy_decode(candidate, prompt, embeds, 151676, 16, (151645, 151643), keep_logits=True, prefill_chunk=64)
    assert got.tokens == expected.tokens
    assert min(cosine(a, b) for a, b in zip(got.logits, expected.logits)) > 0.999


def test_fp16_aligner_graph_matches_fp32_on_onnxruntime_cpu(derived):
    bundle = derived("tiny-aligner", "fp16")
    reference, candidate = OnnxRuntimeBackend(bundle), OnnxRuntimeCudaBackend(bundle, precision="fp16", device="cpu")
    stamp = bundle.tokens["timestamp"]
    ids = np.array([[151669] + [151676] * 20 + [151670, 100, stamp, stamp, 200, stamp, stamp]], dtype=np.int64)
    embeds = np.random.default_rng(1).standard_normal((1, 20, bundle.model["text"]["hidden_size"])).astype(np.float32)
    classes, logits = reference.align(ids, embeds)
    got_classes, got_logits = candidate.align(ids, embeds)
    assert got_logits.shape == logits.shape == (4, bundle.manifest["aligner"]["classes"])
    assert min(cosine(a, b) for a, b in zip(got_logits, logits)) > 0.999


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_derived_graphs_hold_the_tied_table_once(bundle):
    """The fp32 graph names the table twice (an ORT memory alias); TensorRT must get one copy."""
    derived = derive_bundle(Bundle.load(bundle("tiny")), "bf16", progress=lambda line: None)
    graph = onnx.load(str(derived / "decoder.onnx"), load_external_data=False)
    assert len([t for t in graph.graph.initializer if list(t.dims) == [151936, 48]]) == 1
