"""The GPU check: on a CUDA machine, run the GPU tests and time ONNX Runtime's CUDA provider.

    python scripts/gpu_check.py [--cache DIR] [--skip-tests] [--columns fp16 fused-fp16 ...] [--json FILE]

It makes a full-size random Qwen3-ASR-0.6B in the official layout (once, in the cache), exports
its fp32 bundle with the traced decoder and with the fused one, runs `pytest -m gpu` (no official
package needed), then for each column (the traced decoder in fp32, fp16 and bf16; the fused
decoder, its steps replayed as CUDA graphs, in fp16 and bf16) derives the graphs, checks the ids
against ONNX Runtime on the CPU and runs `qasr verify` on 10 s of speech, and times the audio
path (10 s and 60 s), the prefill and the decode steps at batch 1, 8 and 32. It writes the GPU
section of docs/benchmarks.md. Random weights: the figures are speed and agreement, never accuracy.

Needs the runtime, onnxruntime-gpu and cuda-python, plus torch, onnx and safetensors for the
random checkpoint and its export. Written for Python 3.12, torch 2.11 (CUDA 13) and
onnxruntime-gpu 1.31.1, and run on an H200 with them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qasr.bench.docs import DOC, write_section  # noqa: E402
from qasr.bench.harness import prepare, speech_file  # noqa: E402
from qasr.errors import QasrError  # noqa: E402

# column -> (decoder, precision); the fused decoder runs fp16 and bf16 only (GroupQueryAttention's CUDA kernels)
COLUMNS = {"fp32": ("traced", "fp32"), "fp16": ("traced", "fp16"), "bf16": ("traced", "bf16"),
           "fused-fp16": ("fused", "fp16"), "fused-bf16": ("fused", "bf16")}
SECONDS = (10, 60)
BATCHES = (1, 8, 32)
STEPS = 64  # decode steps timed per batch size
REPEATS = 3  # the fastest of these counts
ID_TOKENS = 24  # free-running ids compared with ONNX Runtime on the CPU
BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35}  # HBM read bandwidth per GPU name, for the floor
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qasr-bench")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--columns", nargs="+", choices=COLUMNS, default=list(COLUMNS),
                        help="which decoder and precision columns to measure (default: all)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--rehearse", action="store_true",
                        help="a dry run on the CPU (the backend's CPU device, the tiny preset): checks the script "
                             "itself before GPU time is spent; its figures mean nothing")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    facts = rehearsal() if args.rehearse else environment()
    say(f"{facts['gpu']} (sm {facts['compute_capability']}), onnxruntime {facts['onnxruntime']}")
    began = time.perf_counter()
    checkpoint, bundle = prepare("tiny" if args.rehearse else "0.6b", args.cache)
    bundles = {"traced": bundle}
    if any(column.startswith("fused") for column in args.columns):
        bundles["fused"] = fused_bundle(checkpoint, bundle)
    facts["prepare_s"] = time.perf_counter() - began
    facts["tests"] = None if args.skip_tests else run_tests()
    device = "cpu" if args.rehearse else "cuda"
    facts["precisions"] = {}
    for column in args.columns:  # written after each column: a run cut short by a time limit keeps what it measured
        decoder, precision = COLUMNS[column]
        facts["precisions"][column.replace("-", " ")] = guarded(measure, bundles[decoder], precision, args.cache, device)
        text = report(facts)
        write_section(args.doc, BEGIN, END, text)
        if args.json:
            args.json.write_text(json.dumps(facts, indent=1, default=float), encoding="utf-8")
    print(text)
    return 0


def say(line: str) -> None:
    print(f"gpu_check: {line}", file=sys.stderr, flush=True)


def environment() -> dict:
    import onnxruntime as ort

    from qasr.runtime.backends.cuda import Cuda
    from qasr.runtime.backends.onnxruntime_cuda import cuda_provider_available, quiet_onnxruntime

    if not cuda_provider_available():
        raise SystemExit("gpu_check: onnxruntime-gpu's CUDA provider is not available here")
    quiet_onnxruntime()
    facts = {**Cuda().device(), "onnxruntime": ort.__version__, "python": platform.python_version()}
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        pass
    return facts


def rehearsal() -> dict:
    import onnxruntime as ort

    return {"gpu": "CPU rehearsal", "compute_capability": "-", "onnxruntime": ort.__version__,
            "python": platform.python_version()}


def fused_bundle(checkpoint: Path, bundle: Path) -> Path:
    """The checkpoint exported with the fused decoder, beside its traced bundle (once)."""
    from qasr.export.onnx_export import export_bundle
    from qasr.runtime.bundle import Bundle

    path = bundle.with_name(bundle.name + "-fused")
    try:
        Bundle.load(path)
    except QasrError:
        export_bundle(checkpoint, path, progress=say, decoder="fused")
    return path


def run_tests() -> dict:
    """`pytest -m gpu` on the GPU test modules: its summary line and exit status."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
               "tests/test_gpu.py", "tests/test_tensorrt.py"]
    say("running " + " ".join(command[2:]))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    print(done.stdout[-6000:], file=sys.stderr)
    return {"status": done.returncode, "summary": lines[-1] if lines else "",
            "skipped": [line for line in lines if line.startswith("SKIPPED")]}


def guarded(measure, *args) -> dict:
    """A failure of one precision is reported in its column, with its traceback on stderr, and the
    check goes on: device time is scarce, and the other columns are still worth having."""
    import traceback

    try:
        return measure(*args)
    except Exception as error:  # noqa: BLE001 - any failure is a finding here
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}


def measure(bundle: Path, precision: str, cache: Path, device: str) -> dict:
    """Every figure of one precision, or the one line that says why it does not run."""
    from qasr.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend
    from qasr.runtime.backends.onnxruntime_cuda_fused import OnnxRuntimeCudaFusedBackend
    from qasr.runtime.bundle import Bundle
    from qasr.runtime.resolve import derive_graphs
    from qasr.runtime.transcribe import Transcriber

    loaded = Bundle.load(bundle)
    out: dict = {}
    try:
        began = time.perf_counter()
        if precision != "fp32":
            derive_graphs(loaded, precision, say)
        out["derive_s"] = time.perf_counter() - began
        began = time.perf_counter()
        kind = OnnxRuntimeCudaFusedBackend if loaded.fused_decoder else OnnxRuntimeCudaBackend
        backend = kind(loaded, precision=precision, device=device)
        backend.sessions["decoder"]
        out["load_s"] = time.perf_counter() - began
    except QasrError as error:
        say(f"{precision}: {error}")
        return {"error": str(error)}
    model = Transcriber(loaded, backend)
    say(f"{precision}: timing")
    waves = {s: load_wave(speech_file(cache, s)) for s in SECONDS}
    for seconds, wave in waves.items():
        out[f"{seconds}s"] = time_clip(model, wave)
    out["batches"] = time_batches(model, waves[10])
    out["ids"] = compare_ids(model, waves[10])
    out["verify"] = run_verify(bundle, speech_file(cache, 10), precision) if device == "cuda" else {"passed": None}
    out["decoder_gb"] = decoder_bytes(loaded, precision) / 1e9
    out["nodes"] = step_nodes(backend)
    return out


def step_nodes(backend) -> dict:
    """Nodes one decode step runs, per execution provider, from ONNX Runtime's profiler: a
    decoder session of its own with profiling on, fed a batch-1 step over 200 cache rows."""
    import onnxruntime as ort

    graph = backend.graph_dir / backend.graphs["decoder"]["file"]
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "step")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=backend.providers)
    layers, _, _, heads, _, dim = backend.cache_shape
    cache = ort.OrtValue.ortvalue_from_shape_and_type([1, heads, 256, dim], backend.cache_type, backend.device,
                                                      backend.device_id)  # bf16 has no numpy type: a device value
    binding = session.io_binding()
    feeds = {"input_ids": np.zeros((1, 1), np.int64), "audio_embeds": np.zeros((1, 1, backend.hidden_size), np.float32)}
    fused = getattr(backend, "slots", False)  # the fused decoder (docs/graphs.md)
    if fused:
        feeds |= {"seqlens_k": np.array([199], np.int32), "total_sequence_length": np.array(256, np.int32)}
    else:
        feeds |= {"position": np.array([199], np.int64), "cache_start": np.zeros(1, np.int64)}
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for i in range(layers):
        for kind in ("key", "value"):
            binding.bind_ortvalue_input(f"past_{kind}_{i}", cache)
            if fused:
                binding.bind_ortvalue_output(f"present_{kind}_{i}", cache)
    for output in session.get_outputs():
        if not output.name.startswith("present_"):
            binding.bind_output(output.name, backend.device, backend.device_id)
    session.run_with_iobinding(binding)
    events = json.loads(Path(session.end_profiling()).read_text())
    counts: dict[str, int] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            provider = event["args"].get("provider", "?")
            counts[provider] = counts.get(provider, 0) + 1
    return {"per_provider": counts, "per_layer": sum(counts.values()) / layers}


def load_wave(path: Path) -> np.ndarray:
    import soundfile as sf

    return sf.read(path, dtype="float32")[0]


def fastest(run, repeats: int = REPEATS) -> float:
    return min(run() for _ in range(repeats))


def time_clip(model, wave: np.ndarray) -> dict:
    """The audio path (frontend, encoder, projector), the prefill and batch-1 decode of one clip."""
    from qasr.kernels.fbank import log_mel
    from qasr.runtime.batch import greedy_decode
    from qasr.runtime.prompt import prompt_ids

    def timed(stage) -> float:
        began = time.perf_counter()
        stage()
        return time.perf_counter() - began

    embeds = model.encode((wave, 16000))
    frontend = fastest(lambda: timed(lambda: log_mel(wave)))
    audio = fastest(lambda: timed(lambda: model.encode((wave, 16000))))
    prompt = prompt_ids(model.tokenizer, "", None, len(embeds))

    def decoded(budget: int):
        return greedy_decode(model.backend, prompt, embeds, model.audio_token, budget, ())

    prefill = fastest(lambda: decoded(1).prefill_seconds)
    decode = fastest(lambda: decoded(STEPS + 1).decode_seconds)
    return {"frontend_s": frontend, "audio_s": audio, "encoder_s": audio - frontend, "prefill_s": prefill,
            "ttft_s": audio + prefill, "decode_ms": 1000 * decode / STEPS, "prompt_tokens": len(prompt)}


def time_batches(model, wave: np.ndarray) -> dict:
    """Decode steps of B rows, each a different 10 s prompt, in one shared cache."""
    from qasr.runtime.batch import BatchDecoder
    from qasr.runtime.decode import Sequence
    from qasr.runtime.prompt import prompt_ids

    sequences = []
    for i in range(max(BATCHES)):
        clip = np.roll(wave, i * 4000)
        embeds = model.encode((clip, 16000))
        prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
        sequences.append(Sequence(prompt, embeds, model.audio_token, STEPS + 8, ()))
    engine = BatchDecoder(model.backend, max_batch=max(BATCHES))
    for sequence in sequences:
        engine.add(sequence)
    engine.step()  # admits and prefills every row, then one step
    starts = np.array([engine.starts[id(s)] for s in sequences])
    first = np.array([s.position for s in sequences])
    ids = np.array([s.token for s in sequences])
    rates = {}
    for batch in BATCHES:
        def sweep() -> float:
            positions = first.copy()  # each sweep rewrites the same rows, inside the regions
            began = time.perf_counter()
            for _ in range(STEPS):
                ids[:batch] = model.backend.step(ids[:batch], starts[:batch], positions[:batch])
                positions[:batch] += 1
            return time.perf_counter() - began

        seconds = fastest(sweep)
        rates[batch] = {"step_ms": 1000 * seconds / STEPS, "tokens_per_s": batch * STEPS / seconds}
    return rates


def compare_ids(model, wave: np.ndarray) -> dict:
    """Free-running ids against the fp32 graphs on ONNX Runtime's CPU provider."""
    from qasr.runtime.backends.select import open_backend
    from qasr.runtime.batch import greedy_decode
    from qasr.runtime.embed import embed_audio
    from qasr.runtime.prompt import prompt_ids

    cpu = open_backend(model.bundle, "onnxruntime")
    embeds = model.encode((wave, 16000))
    cpu_embeds = embed_audio(cpu, wave, model.window_frames)
    prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
    got = greedy_decode(model.backend, prompt, embeds, model.audio_token, ID_TOKENS, ()).tokens
    expected = greedy_decode(cpu, prompt, cpu_embeds, model.audio_token, ID_TOKENS, ()).tokens
    rel = float(np.abs(embeds - cpu_embeds).max() / np.abs(cpu_embeds).max())
    return {"identical": got == expected, "agreement": float(np.mean([a == b for a, b in zip(got, expected)])),
            "embed_rel_error": rel, "tokens": ID_TOKENS}


def run_verify(bundle: Path, audio: Path, precision: str) -> dict:
    from qasr.runtime.verify import verify

    report = verify(str(bundle), [str(audio)], reference=str(bundle), backend="onnxruntime-cuda",
                    precision=precision, max_new_tokens=48)
    return {"passed": report.shortfall() is None, "shortfall": report.shortfall(), "figures": report.figures()}


def decoder_bytes(bundle, precision: str) -> int:
    """Bytes a decode step reads at least: the decoder's weights (the head included) in `precision`."""
    data = sum(f.stat().st_size for f in bundle.path.glob("decoder.onnx*"))
    return data // 2 if precision != "fp32" else data


def report(facts: dict) -> str:
    bandwidth = next((tbs for name, tbs in BANDWIDTH_TBS.items() if name in facts["gpu"]), None)
    lines = [
        f"## GPU: ONNX Runtime's CUDA provider ({facts['gpu']})",
        "",
        f"`python scripts/gpu_check.py` on one {facts['gpu']} (sm {facts['compute_capability']}), onnxruntime "
        f"{facts['onnxruntime']}, Python {facts['python']}, torch {facts.get('torch', '-')} for the checkpoint; "
        "full-size random Qwen3-ASR-0.6B (random weights: speed and agreement, not accuracy), the fastest of "
        f"{REPEATS} runs. Decode steps are timed over {STEPS} steps; batch B rows hold different 10 s prompts in "
        "one shared cache.",
        "",
    ]
    tests = facts.get("tests")
    if tests:
        lines += [f"GPU tests (`pytest -m gpu`, no official package installed): {tests['summary']} "
                  f"(exit status {tests['status']}).", ""]
        lines += [f"- {line}" for line in tests["skipped"]] + ([""] if tests["skipped"] else [])
    runs = {p: r for p, r in facts["precisions"].items() if "error" not in r}
    if runs:
        lines += table(runs, bandwidth)
    for precision, run in facts["precisions"].items():
        if "error" in run:
            lines += ["", f"{precision}: does not run on this provider: {run['error']}"]
    return "\n".join(lines)


def table(runs: dict, bandwidth: float | None) -> list[str]:
    """One column per decoder and precision that ran, one row per figure."""
    lines = ["| figure | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]

    def row(name: str, value) -> None:
        lines.append(f"| {name} | " + " | ".join(value(r) for r in runs.values()) + " |")

    for seconds in SECONDS:
        key = f"{seconds}s"
        row(f"audio path, {seconds} s clip (frontend on the CPU + encoder + projector), s",
            lambda r: f"{r[key]['audio_s']:.3f} (frontend {r[key]['frontend_s']:.3f})")
        row(f"prefill, {seconds} s clip ({runs[next(iter(runs))][key]['prompt_tokens']} tokens), s",
            lambda r: f"{r[key]['prefill_s']:.3f}")
        row(f"time to first token, {seconds} s clip, ms", lambda r: f"{1000 * r[key]['ttft_s']:.0f}")
        row(f"decode, batch 1, {seconds} s clip, ms/token", lambda r: f"{r[key]['decode_ms']:.2f}")
    for batch in BATCHES:
        row(f"decode step, batch {batch}, ms (tokens/s in all)",
            lambda r: f"{r['batches'][batch]['step_ms']:.2f} ({r['batches'][batch]['tokens_per_s']:.0f})")
    if bandwidth:
        row(f"bandwidth floor at {bandwidth} TB/s (decoder weights), ms/token; fraction reached at batch 1",
            lambda r: f"{r['decoder_gb'] / bandwidth:.2f}; {r['decoder_gb'] / bandwidth / r['10s']['decode_ms']:.0%}")
    row(f"ids over {ID_TOKENS} free-running tokens vs ONNX Runtime CPU (10 s)",
        lambda r: "identical" if r["ids"]["identical"] else f"{r['ids']['agreement']:.0%} agree")
    row("decoder nodes run per decode step (per layer); of them on the CPU",
        lambda r: f"{sum(r['nodes']['per_provider'].values())} ({r['nodes']['per_layer']:.1f}); "
                  f"{r['nodes']['per_provider'].get('CPUExecutionProvider', 0)}")
    row("audio embeddings, relative error vs CPU", lambda r: f"{r['ids']['embed_rel_error']:.1e}")
    row("`qasr verify` (10 s, 48 tokens)", lambda r: {True: "passes", False: "FAILS", None: "-"}[r["verify"]["passed"]])
    row("graphs derived on first use, s; sessions loaded, s", lambda r: f"{r['derive_s']:.1f}; {r['load_s']:.1f}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
