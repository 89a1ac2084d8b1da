"""ONNX Runtime's CUDA provider: the onnxruntime-cuda backend against ONNX Runtime on the CPU.

The GPU tests (`pytest -m gpu`) need onnxruntime-gpu, cuda-python and a CUDA device, never the
official package: they compare two of the project's own paths, so they run on a GPU machine where
the oracle is not installed. Elsewhere they skip with the reason. The first test runs everywhere:
the backend's binding logic on the CPU device, which copies each input when it is bound, as the
CUDA provider does, so a decode step that writes into a stale host array fails here too.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf

from support import AUDIO, DATA, EOS, PROMPT_HEAD, PROMPT_TAIL, check_batch, check_parity
from qasr.errors import BundleError, EngineError
from qasr.export.precision import derive_bundle
from qasr.runtime.align import Aligner
from qasr.runtime.bundle import Bundle
from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend
from qasr.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend
from qasr.runtime.backends.onnxruntime_cuda_fused import OnnxRuntimeCudaFusedBackend
from qasr.runtime.backends.onnxruntime_fused import OnnxRuntimeFusedBackend
from qasr.runtime.transcribe import Transcriber


def test_binding_on_the_cpu_device_steps_like_onnxruntime(bundle, speech):
    """The batch path (shared cache, per-row writes, inputs refreshed every step) on the CPU device."""
    loaded = Bundle.load(bundle("tiny"))
    check_batch(OnnxRuntimeCudaBackend(loaded, device="cpu"), OnnxRuntimeBackend(loaded), speech)
    check_parity(OnnxRuntimeCudaBackend(loaded, device="cpu"), OnnxRuntimeBackend(loaded), speech, True, 1e-5)


def test_fused_binding_on_the_cpu_device_equals_the_cpu_backend(fused, speech):
    """The fused decoder's device path (inputs of its own refreshed in place, cache blocks bound by
    slot, buckets with idle rows, a cache that only grows) on the CPU device: the CPU backend's ids,
    batched and alone, and its logits."""
    loaded = Bundle.load(fused())
    check_batch(OnnxRuntimeCudaFusedBackend(loaded, precision="fp32", device="cpu"), OnnxRuntimeFusedBackend(loaded),
                speech)
    check_parity(OnnxRuntimeCudaFusedBackend(loaded, precision="fp32", device="cpu"), OnnxRuntimeFusedBackend(loaded),
                 speech, True, 1e-6)


def test_fused_stream_on_the_cpu_device_equals_the_cpu_backend(fused, speech):
    """A stream keeps its slot's rows between steps (an idle row while other calls run) and cuts
    segments: the device path's events are the CPU fused backend's, one for one."""
    loaded = Bundle.load(fused())
    wave = np.concatenate([speech(9.0), np.zeros(8000, dtype=np.float32), speech(13.0, start=1)])
    runs = []
    for backend in (OnnxRuntimeCudaFusedBackend(loaded, precision="fp32", device="cpu"),
                    OnnxRuntimeFusedBackend(loaded)):
        stream = Transcriber(loaded, backend).stream(max_new_tokens=12, segment_seconds=10)
        events = [e for start in range(0, len(wave), 12000) for e in stream.feed(wave[start : start + 12000])]
        runs.append([(e.chunk, e.text, e.committed) for e in events + stream.finish()])
    assert runs[0] == runs[1]
    assert len(runs[0]) >= 10


def test_fused_device_cache_grows_keeping_every_slot_s_rows(fused):
    """A cache that grows while two slots hold rows (slots up to a bucket, rows at least doubled)
    decodes as one that was large from the start, on the CPU device."""
    loaded = Bundle.load(fused())
    ids = np.array([[151644, 8948, 198, 7, 8, 9, 151645, 198]], dtype=np.int64)
    audio = np.zeros((1, 1, loaded.model["text"]["hidden_size"]), dtype=np.float32)

    def run(first, then):
        backend = OnnxRuntimeCudaFusedBackend(loaded, precision="fp32", device="cpu")
        backend.reserve(first)
        tokens = [backend.prefill(ids, audio, 0, 0), backend.prefill(ids[:, :5], audio, 1, 0)]
        backend.reserve(then)
        return backend.reserved, tokens + list(backend.step(np.array([5, 6]), np.array([0, 1]), np.array([8, 5])))

    grown, expected = run((2, 16), (3, 20)), run((4, 64), (4, 64))
    assert grown[0] == (4, 32) and grown[1] == expected[1]


def test_fused_fp16_on_the_cpu_device_is_within_verify_s_limits(fused, speech, tmp_path):
    """The derived fp16 fused decoder (what the GPU runs), here on the CPU provider: teacher-forced
    logits against the fp32 fused graph within verify's limits (cosine, top-1)."""
    loaded = own_copy(fused(), tmp_path)
    derive_bundle(loaded, "fp16", progress=lambda line: None)
    check_parity(OnnxRuntimeCudaFusedBackend(loaded, precision="fp16", device="cpu"), OnnxRuntimeFusedBackend(loaded),
                 speech, False, 2e-2)


@pytest.fixture(scope="module")
def gpu():
    """Skip, with the reason, unless onnxruntime-gpu's CUDA provider and a CUDA device are here."""
    from qasr.runtime.backends.cuda import Cuda
    from qasr.runtime.backends.onnxruntime_cuda import cuda_provider_available

    if not cuda_provider_available():
        pytest.skip("onnxruntime-gpu is not installed (no CUDA execution provider)")
    try:
        Cuda()
    except EngineError as error:
        pytest.skip(str(error))


@pytest.fixture
def clip(speech, tmp_path):
    """clip(seconds, start=0) -> a wav file of that much speech."""

    def write(seconds: float, start: int = 0):
        path = tmp_path / f"speech-{seconds:g}-{start}.wav"
        sf.write(path, speech(seconds, start=start), 16000)
        return path

    return write


def own_copy(source, tmp_path) -> Bundle:
    """A private copy of a bundle, for tests that derive graphs into it."""
    path = tmp_path / source.name
    shutil.copytree(source, path)
    return Bundle.load(path)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-mqa"])
def test_fp32_ids_equal_onnxruntime_on_the_cpu(gpu, bundle, speech, preset):
    loaded = Bundle.load(bundle(preset))
    check_parity(OnnxRuntimeCudaBackend(loaded), OnnxRuntimeBackend(loaded), speech, True, 1e-3)
    on_gpu = Transcriber(loaded, OnnxRuntimeCudaBackend(loaded, precision="fp32"))
    on_cpu = Transcriber(loaded, OnnxRuntimeBackend(loaded))
    for seconds, start in ((3.0, 0), (11.0, 1), (34.0, 0)):
        wave = (speech(seconds, start=start), 16000)
        assert on_gpu.transcribe(wave).token_ids == on_cpu.transcribe(wave).token_ids, seconds


@pytest.mark.gpu
def test_the_batch_engine_on_the_gpu_equals_one_at_a_time(gpu, bundle, speech):
    loaded = Bundle.load(bundle("tiny"))
    check_batch(OnnxRuntimeCudaBackend(loaded, precision="fp32"), OnnxRuntimeBackend(loaded), speech)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_passes_verify(gpu, bundle, clip, tmp_path, precision):
    """fp16 (and bf16 where the CUDA provider has the kernels) within verify's limits for it, the
    graphs derived on first use and kept in the bundle."""
    from qasr.runtime.verify import verify

    loaded = own_copy(bundle("tiny"), tmp_path)
    audio = [clip(7.0), clip(19.0, start=1)]
    try:
        report = verify(str(loaded.path), audio, reference=str(loaded.path), backend="onnxruntime-cuda",
                        precision=precision)
    except (BundleError, EngineError) as error:
        if precision == "bf16" and "bf16" in str(error):
            pytest.skip(f"the CUDA provider does not run the bf16 graphs: {error}")
        raise
    assert report.precision["decoder"] == precision
    assert report.shortfall() is None, report.to_text()
    assert (loaded.path / "derived" / precision / "graphs.json").is_file()


@pytest.mark.gpu
def test_a_stream_on_the_gpu_equals_the_stream_on_the_cpu(gpu, bundle, speech):
    loaded = Bundle.load(bundle("tiny"))
    wave = np.concatenate([speech(9.0), np.zeros(8000, dtype=np.float32), speech(13.0, start=1)])
    runs = []
    for backend in (OnnxRuntimeCudaBackend(loaded, precision="fp32"), OnnxRuntimeBackend(loaded)):
        stream = Transcriber(loaded, backend).stream(max_new_tokens=12, segment_seconds=10)
        events = [e for start in range(0, len(wave), 12000) for e in stream.feed(wave[start : start + 12000])]
        runs.append([(e.chunk, e.text, e.committed) for e in events + stream.finish()])
    assert runs[0] == runs[1]
    assert len(runs[0]) >= 10


@pytest.mark.gpu
def test_the_aligner_on_the_gpu_equals_the_cpu(gpu, bundle, clip):
    loaded = Bundle.load(bundle("tiny-aligner"))
    stamp = loaded.tokens["timestamp"]
    ids = np.array([[151669] + [AUDIO] * 20 + [151670, 100, stamp, stamp, 200, stamp, stamp]], dtype=np.int64)
    embeds = np.random.default_rng(1).standard_normal((1, 20, loaded.model["text"]["hidden_size"])).astype(np.float32)
    classes, logits = OnnxRuntimeBackend(loaded).align(ids, embeds)
    got_classes, got_logits = OnnxRuntimeCudaBackend(loaded, precision="fp32").align(ids, embeds)
    assert np.array_equal(got_classes, classes)
    assert min(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(got_logits, logits)) >= 0.9999
    text = "The quick brown fox jumps over the lazy dog."
    words = [Aligner(loaded, b).align(str(clip(6.0)), text, "English")
             for b in (OnnxRuntimeCudaBackend(loaded, precision="fp32"), OnnxRuntimeBackend(loaded))]
    assert words[0] == words[1]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_qasr_verify_on_onnxruntime_cuda_passes(gpu, bundle, clip, tmp_path, capsys, precision):
    from qasr.cli import main

    loaded = own_copy(bundle("tiny"), tmp_path)
    args = ["verify", str(loaded.path), str(clip(9.0)), "--reference", str(loaded.path),
            "--backend", "onnxruntime-cuda", "--precision", precision]
    assert main(args) == 0, capsys.readouterr()
    out = capsys.readouterr()
    assert "within the limits" in out.out and out.err == ""


@pytest.mark.gpu
def test_qasr_transcribe_on_onnxruntime_cuda_gives_the_cpu_s_ids(gpu, bundle, clip, capsys):
    """fp32 graphs on the GPU: the very ids of the CPU, and nothing from ONNX Runtime on stderr."""
    import json

    from qasr.cli import main

    audio = str(clip(12.0, start=1))
    results = []
    for backend in ("onnxruntime-cuda", "onnxruntime"):
        assert main(["transcribe", audio, "--model", str(bundle("tiny")), "--backend", backend, "--precision",
                     "fp32", "--format", "json"]) == 0
        out = capsys.readouterr()
        results.append(json.loads(out.out)["token_ids"])
        assert all(line.startswith("qasr: warning: ") for line in out.err.splitlines()), out.err
    assert results[0] == results[1]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_fused_decoder_on_the_gpu(gpu, fused, speech, tmp_path, precision):
    """Every node of a step on the GPU, replayed as CUDA graphs: within verify's limits of the fp32
    fused graph on the CPU, and batched decoding with replayed graphs gives the ids the same batches
    give without graphs (the same kernels, launched one by one)."""
    from qasr.runtime.batch import BatchDecoder
    from qasr.runtime.decode import Sequence

    loaded = own_copy(fused(), tmp_path)
    graphs = OnnxRuntimeCudaFusedBackend(loaded, precision=precision)
    check_parity(graphs, OnnxRuntimeFusedBackend(loaded), speech, False, 2e-2)
    runs = []
    for backend in (graphs, OnnxRuntimeCudaFusedBackend(loaded, precision=precision, cuda_graph=False)):
        engine = BatchDecoder(backend, max_batch=3, prefill_chunk=64)
        sequences = []
        for i, seconds in enumerate((7.0, 2.5, 11.0, 4.0, 1.2)):
            embeds = Transcriber(loaded, backend).encode(speech(seconds, start=i), 16000)
            sequences.append(Sequence(PROMPT_HEAD + [AUDIO] * len(embeds) + PROMPT_TAIL, embeds, AUDIO, 8 + 4 * i, EOS))
            engine.add(sequences[-1])
        engine.run()
        runs.append([s.result.tokens for s in sequences])
    assert runs[0] == runs[1]


@pytest.mark.gpu
def test_qasr_transcribe_runs_a_fused_bundle_on_the_gpu(gpu, fused, tmp_path, capsys):
    """The command line picks the fused CUDA backend, derives fp16 once and prints a transcript."""
    from qasr.cli import main

    loaded = own_copy(fused(), tmp_path)
    argv = ["transcribe", str(DATA / "en_16k_s16.wav"), "--model", str(loaded.path), "--backend", "onnxruntime-cuda"]
    assert main(argv) == 0
    assert (loaded.path / "derived" / "fp16").is_dir() and capsys.readouterr().out.strip()
