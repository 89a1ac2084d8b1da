"""The fused decoder (qasr.export.fused_decoder, qasr.runtime.backends.onnxruntime_fused): nodes per step
counted by ONNX Runtime's profiler, ids against the official package and the traced graph, batches
against one request at a time, streaming with kept rows, and the quantized forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf

from oracle import load_official, official_transcribe
from qasr.cli import main
from qasr.export.fused_decoder import fused_cache_names
from qasr.export.quantize import quantize_bundle
from qasr.runtime.bundle import Bundle
from qasr.runtime.backends.onnxruntime_fused import OnnxRuntimeFusedBackend
from qasr.runtime.transcribe import Transcriber
from qasr.runtime.verify import verify
from test_stream import Counting, assert_same_steps, run_steps
from support import DATA

FILES = ["en_16k_s16.wav", "de_22k.flac", "fr_48k.ogg", "zh_16k_f32_loud.wav", "es_16k_4ch.wav"]
BUDGET = 20


@pytest.fixture(scope="module")
def models(checkpoint, bundle, fused):
    official = load_official(checkpoint("tiny"), max_new_tokens=BUDGET)
    official.max_inference_batch_size = 1
    return (official, Transcriber.load(fused(), backend="onnxruntime"),
            Transcriber.load(bundle("tiny"), backend="onnxruntime"))


def profiled_step_nodes(path: Path, rows: int = 2, filled: int = 5) -> list[tuple[str, str]]:
    """(node name, op type) of each node ONNX Runtime runs in one decode step of `rows` rows, from its profiler."""
    bundle = Bundle.load(path)
    text = bundle.model["text"]
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path / "profile")
    session = ort.InferenceSession(str(bundle.graph_path("decoder")), options, providers=["CPUExecutionProvider"])
    past, _ = fused_cache_names(text["num_hidden_layers"])
    cache = np.zeros((rows, text["num_key_value_heads"], 64, text["head_dim"]), dtype=np.float32)
    feeds = {"input_ids": np.full((rows, 1), 7, dtype=np.int64),
             "audio_embeds": np.zeros((rows, 1, text["hidden_size"]), dtype=np.float32),
             "seqlens_k": np.full(rows, filled, dtype=np.int32), "total_sequence_length": np.array(filled + 1, np.int32),
             **{name: cache for name in past}}
    session.run(["next_token"], feeds)  # the first run also records the session's set-up
    began = len(json.loads(Path(session.end_profiling()).read_text()))
    session = ort.InferenceSession(str(bundle.graph_path("decoder")), options, providers=["CPUExecutionProvider"])
    session.run(["next_token"], feeds)
    session.run(["next_token"], feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    assert began > 0
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return [(e["name"][: -len("_kernel_time")], e["args"]["op_name"]) for e in nodes[len(nodes) // 2:]]  # the 2nd run's


def test_a_decode_step_is_at_most_15_nodes_per_layer(fused):
    """Counted as the issue counts them (94.5 per layer for the traced graph): every node the
    profiler sees run in one step, divided by the layers, here for the released 0.6B's 28 layers
    (the tiny model's 2 would spread the embedding and head nodes over too few); attention is one
    node per layer."""
    layers = Bundle.load(fused()).model["text"]["num_hidden_layers"]
    for weights in ("fp32", "int4"):
        nodes = profiled_step_nodes(fused(weights))
        ops = [op for _, op in nodes]
        per_layer = [sum(name.startswith(f"l{i}/") for name, _ in nodes) for i in range(layers)]
        outside = len(nodes) - sum(per_layer)
        assert max(per_layer) == 13 and outside <= 12, (weights, per_layer, outside)
        assert 13 + outside / 28 <= 15
        assert ops.count("GroupQueryAttention") == layers
        assert not {"Shape", "Reshape", "Softmax", "Transpose", "Range"} & set(ops)
        matmul = "MatMul" if weights == "fp32" else "MatMulNBits"
        assert ops.count(matmul) == 5 * layers + (weights != "fp32")  # qkv, o, gate, up, down (+ the int4 head)


@pytest.mark.parametrize("name,language,context", [("en_16k_s16.wav", None, ""), ("de_22k.flac", "German", ""),
                                                   ("zh_16k_f32_loud.wav", None, "交易 停滞")])
def test_ids_match_the_official_package_and_the_traced_graph(models, name, language, context):
    official, ours, traced = models
    expected, ids = official_transcribe(official, str(DATA / name), language=language, context=context)
    result = ours.transcribe(str(DATA / name), language=language, context=context, max_new_tokens=BUDGET)
    assert result.token_ids == ids
    assert (result.text, result.language) == (expected.text, expected.language)
    assert traced.transcribe(str(DATA / name), language=language, context=context,
                             max_new_tokens=BUDGET).token_ids == ids
    assert isinstance(ours.backend, OnnxRuntimeFusedBackend)


def test_long_recording_matches_the_traced_graph(models, speech, tmp_path):
    """65 s: a prompt of several prefill chunks into one slot, then the steps."""
    _, ours, traced = models
    path = tmp_path / "long.wav"
    sf.write(path, speech(65.0, start=1), 16000, subtype="PCM_16")
    assert ours.transcribe(str(path), max_new_tokens=BUDGET).token_ids == \
        traced.transcribe(str(path), max_new_tokens=BUDGET).token_ids


@pytest.mark.parametrize("batch_size", [2, 4])
def test_a_batch_equals_one_at_a_time(models, batch_size):
    """Requests of different lengths and budgets (the default budget grows with the audio) share
    steps, leave and are replaced (continuous batching): a freed slot is an idle row of the next
    steps until a newcomer takes it."""
    _, ours, _ = models
    paths = [str(DATA / name) for name in FILES]
    alone = [ours.transcribe(path).token_ids for path in paths]
    assert len({len(ids) for ids in alone}) > 2
    assert [r.token_ids for _, r in ours.transcribe_many(paths, batch_size=batch_size)] == alone


def test_streaming_keeps_rows_and_matches_the_traced_graph(models, speech):
    """Every step's ids as with the traced decoder, and every step after the first reuses the rows
    its slot kept instead of prefilling them again."""
    _, ours, traced = models
    wav = speech(13.0, start=0)
    counting = Counting(ours.backend)
    ours.backend = counting
    try:
        fused_steps = run_steps(ours, wav, incremental=True, context="hello")
    finally:
        ours.backend = counting.backend
    assert_same_steps(fused_steps, run_steps(traced, wav, incremental=True, context="hello"))
    assert len(counting.kept) > 3 and all(k > 0 for k in counting.kept[1:])


def test_quantized_bundles_are_as_close_as_the_traced_ones(fused, bundle, tmp_path):
    """int8: verify's figures against the fp32 graph equal the traced int8's against its fp32 (the
    tiny model's flat logits put both outside the released models' limits alike); int4 runs the
    same contract with MatMulNBits and a quantized gather."""
    traced = quantize_bundle(bundle("tiny"), tmp_path / "traced-int8", "int8", progress=lambda line: None)
    audios = [str(DATA / "en_16k_s16.wav"), str(DATA / "zh_16k_f32_loud.wav")]
    ours = verify(str(fused("int8")), audios, max_new_tokens=12).figures()["decoder"]
    theirs = verify(str(traced), audios, max_new_tokens=12).figures()["decoder"]
    assert ours["logit_cosine_mean"] == pytest.approx(theirs["logit_cosine_mean"], abs=1e-4)
    manifest = Bundle.load(fused("int4")).manifest
    assert manifest["graphs"]["decoder"]["layout"] == "slots"
    assert manifest["weights"]["decoder"]["quantized"]["float_weights"] == 0
    ids = Transcriber.load(fused("int4"), backend="onnxruntime").transcribe(audios[0], max_new_tokens=6).token_ids
    assert len(ids) == 6


def test_fused_export_refuses_head_sizes_the_kernel_lacks(checkpoint, tmp_path, capsys):
    code = main(["export", str(checkpoint("tiny-untied")), "--out", str(tmp_path / "b"), "--decoder", "fused"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("export with --decoder traced")


def test_a_request_s_memory_is_its_own_rows(fused):
    """Slots as long as a 20-minute recording's, beside a short request: only the rows written are
    resident (the block's pages come on first write), and the short request decodes as in a cache
    of its own size."""
    from qasr.memory import rss_gb

    bundle = Bundle.load(fused())
    text = bundle.model["text"]
    row_bytes = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * text["head_dim"] * 4
    rows = (2**30 // (4 * row_bytes)) // 64 * 64  # 4 slots of these: 1 GiB of address space
    ids = np.array([[151644, 8948, 198, 7, 8, 9, 151645, 198]], dtype=np.int64)
    audio = np.zeros((1, 1, text["hidden_size"]), dtype=np.float32)
    small = OnnxRuntimeFusedBackend(bundle, threads=1)
    small.reserve((1, 64))
    expected = small.prefill(ids, audio, 0, 0), small.step(np.array([5]), np.array([0]), np.array([8]))
    backend = OnnxRuntimeFusedBackend(bundle, threads=1)
    backend.reserve((1, 64))
    backend.prefill(ids, audio, 0, 0)  # the session loaded and its arena sized before memory is read
    before = rss_gb()
    backend.reserve((4, rows), keep=False)
    got = backend.prefill(ids, audio, 3, 0), backend.step(np.array([5]), np.array([3]), np.array([8]))
    assert rss_gb() - before < 0.05  # of the 1 GiB reserved
    assert got[0] == expected[0] and list(got[1]) == list(expected[1])


@pytest.mark.parametrize("argv", [["transcribe", str(DATA / "en_16k_s16.wav"), "--model", "{bundle}", "--backend",
                                   "tensorrt"],
                                  ["build", "{bundle}"]])
def test_backends_that_bind_the_traced_graph_refuse_it_in_one_line(fused, capsys, argv):
    code = main([arg.format(bundle=fused()) for arg in argv])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "--decoder traced" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("weights, precision, says", [("fp32", "fp32", "fp16 or bf16"),
                                                      ("int8", "auto", "runs on the CPU")])
def test_the_gpu_refuses_what_its_kernels_cannot_run_in_one_line(fused, capsys, weights, precision, says):
    """GroupQueryAttention's CUDA kernels are fp16 and bf16 only; quantized fused decoders stay on the CPU."""
    code = main(["transcribe", str(DATA / "en_16k_s16.wav"), "--model", str(fused(weights)), "--backend",
                 "onnxruntime-cuda", "--precision", precision])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and says in err.strip().splitlines()[-1]


def test_onnxruntime_cuda_without_onnxruntime_gpu_says_what_to_install(fused, capsys):
    """One line before anything is derived into the bundle."""
    from qasr.runtime.backends.onnxruntime_cuda import cuda_provider_available

    if cuda_provider_available():
        pytest.skip("onnxruntime-gpu's CUDA provider is installed here")
    code = main(["transcribe", str(DATA / "en_16k_s16.wav"), "--model", str(fused()), "--backend", "onnxruntime-cuda"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "pip install onnxruntime-gpu" in err.strip().splitlines()[-1]
    assert not (fused() / "derived").exists()


def test_a_fused_bundle_from_before_the_1_31_graph_is_refused_in_one_line(fused, tmp_path, capsys):
    """Its decoder wants `query_seqlens`, which no backend binds now: re-export, says one line."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(fused(), old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["inputs"]["query_seqlens"] = {"dtype": "int32", "shape": ["batch"]}
    (old / "manifest.json").write_text(json.dumps(manifest))
    code = main(["transcribe", str(DATA / "en_16k_s16.wav"), "--model", str(old), "--backend", "onnxruntime"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "export it again" in err.strip().splitlines()[-1]
