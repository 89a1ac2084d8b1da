"""Benchmarks against the official transformers backend, and the physical floor (`qasr bench`).

    python scripts/bench.py [--models 0.6b 1.7b] [--seconds 10 60 300] [--repeats 3]

Full-size random checkpoints of the released shapes (generated once into a cache directory
outside the repository) have the real models' speed and memory. Each measurement runs in a fresh
process, so cold start and peak memory are those of a user's process: the official qwen-asr
transformers backend (fp32 and bf16) and this project's ONNX Runtime backend, on the same
checkpoint and the same speech, in one run. Generation is forced to the same number of tokens on
both sides (3 per second of audio, end-of-sequence ignored), since random weights decide nothing.
Needs the test extras (the official package, torch) for the peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qasr.cpu import cpu_info, widest_simd
from qasr.memory import peak_rss_gb

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
DEFAULT_CACHE = Path(os.environ.get("QASR_BENCH_CACHE", "~/.cache/qasr-bench")).expanduser()
SYSTEMS = ("official-fp32", "official-bf16", "qasr-onnxruntime")
TOKENS_PER_SECOND = 3  # forced generation length: a moderate speech rate
# Peak DRAM bandwidth of the devices the bf16 engines target (GB/s, from NVIDIA's data sheets).
DEVICES = {"Jetson Orin Nano 8 GB": 68, "Jetson AGX Orin": 204.8, "RTX 4090": 1008, "H100 SXM": 3350}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_run_worker(args)), flush=True)
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)
    bandwidth = measure_bandwidth(args.threads)
    rows = []
    for preset in args.models:
        checkpoint, bundle = prepare(preset, args.cache)
        for seconds in args.seconds:
            if f"{preset}:{seconds:g}" in args.skip:
                continue
            audio = speech_file(args.cache, seconds)
            for system in args.systems:
                runs = [worker(system, checkpoint, bundle, audio, seconds, args) for _ in range(args.repeats)]
                rows.append({"model": preset, "seconds": seconds, "system": system, "runs": runs})
                print(_progress_line(rows[-1]), file=sys.stderr, flush=True)
    bandwidth = max(bandwidth, measure_bandwidth(args.threads))  # before and after the runs
    text = report(rows, bandwidth, args)
    (args.cache / "bench-runs.json").write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))
    print(text)
    if not args.no_write:
        write_section(DOC, BEGIN, END, text)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qasr bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["0.6b", "1.7b"], choices=["0.6b", "1.7b"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[10, 60, 300])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], metavar="MODEL:SECONDS",
                        help="cells to leave out, e.g. 1.7b:300 (the slowest: an hour of the official fp32)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed for the per-token median")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where checkpoints and bundles live")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {DOC.name}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for name in ("checkpoint", "bundle", "audio", "spawned"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    return parser


def prepare(preset: str, cache: Path) -> tuple[Path, Path]:
    """The random checkpoint and its bundle, made once and reused from the cache."""
    from qasr.errors import QasrError
    from qasr.export.onnx_export import export_bundle
    from qasr.models.synthetic import make_checkpoint
    from qasr.runtime.bundle import Bundle

    checkpoint, bundle = cache / f"qwen3-asr-{preset}", cache / f"qwen3-asr-{preset}-bundle"
    if not (checkpoint / "config.json").is_file():
        print(f"generating {checkpoint}", file=sys.stderr)
        make_checkpoint(checkpoint, preset, seed=0)
    try:
        Bundle.load(bundle)
    except QasrError:  # missing, or written in an older bundle format: export it (again)
        export_bundle(checkpoint, bundle, progress=lambda line: print(line, file=sys.stderr))
    return checkpoint, bundle


def speech_file(cache: Path, seconds: float) -> Path:
    """Real speech of that length: the test recordings (16 kHz) in turn, written once as a wav."""
    import soundfile as sf

    path = cache / f"speech-{seconds:g}s.wav"
    if not path.is_file():
        clips = [sf.read(ROOT / "tests" / "data" / name, dtype="float32")[0]
                 for name in ("en_16k_s16.wav", "zh_16k_f32_loud.wav")]
        clips = [c / max(1.0, float(np.abs(c).max())) for c in clips]
        reps = int(seconds * 16000 // sum(map(len, clips))) + 1
        sf.write(path, np.concatenate(clips * reps)[: int(seconds * 16000)], 16000, subtype="PCM_16")
    return path


def worker(system, checkpoint, bundle, audio, seconds, args) -> dict:
    """One measurement in a fresh process; its JSON line back."""
    command = [sys.executable, "-m", "qasr.bench", "--worker", system, "--checkpoint", str(checkpoint),
               "--bundle", str(bundle), "--audio", str(audio), "--threads", str(args.threads),
               "--steps", str(args.steps), "--tokens", str(max(args.steps + 1, int(TOKENS_PER_SECOND * seconds))),
               "--spawned", repr(time.time())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{system} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_worker(args) -> dict:
    spawned = float(args.spawned)
    if args.worker == "qasr-onnxruntime":
        result = _qasr_worker(args)
    else:
        result = _official_worker(args, args.worker.rsplit("-", 1)[1])
    result["load"] = result.pop("loaded_at") - spawned
    result["cold_start"] = result.pop("first_token_at") - spawned
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def _qasr_worker(args) -> dict:
    from qasr.kernels.fbank import log_mel
    from qasr.runtime.audio import load_audio
    from qasr.runtime.decode import greedy_decode
    from qasr.runtime.embed import embed_audio
    from qasr.runtime.prompt import prompt_ids
    from qasr.runtime.transcribe import Transcriber

    model = Transcriber.load(args.bundle, backend="onnxruntime", threads=args.threads)
    loaded = [time.time()]  # the decoder loads in the background: ready when its future is done
    for future in model.backend.sessions.pending.values():
        future.add_done_callback(lambda _: loaded.append(time.time()))
    model.transcribe(args.audio, max_new_tokens=1)  # the user's first call: cold start
    first_token_at = time.time()
    wave = load_audio(args.audio)
    frontend = _time(lambda: log_mel(wave))
    encoder = _time(lambda: embed_audio(model.backend, wave, model.window_frames)) - frontend
    stamps: list[float] = []
    began = time.perf_counter()
    embeds = embed_audio(model.backend, wave, model.window_frames)
    prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
    greedy_decode(model.backend, prompt, embeds, model.audio_token, args.tokens, eos_ids=(),
                  on_token=lambda _: stamps.append(time.perf_counter()))
    return _figures(max(loaded), first_token_at, frontend, encoder, began, stamps, args.steps, len(prompt),
                    len(wave) / 16000)


def _official_worker(args, precision: str) -> dict:
    import torch
    from qwen_asr import Qwen3ASRModel
    from qwen_asr.inference.utils import normalize_audio_input
    from transformers import LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Qwen3ASRModel.from_pretrained(args.checkpoint, dtype=dtype, max_new_tokens=1)
    loaded_at = time.time()
    model.transcribe(str(args.audio))  # the user's first call: cold start
    first_token_at = time.time()
    wave = normalize_audio_input(str(args.audio))
    prompt = model._build_text_prompt("", None)
    stamps: list[float] = []
    frontend = _time(lambda: model.processor(text=[prompt], audio=[wave], return_tensors="pt", padding=True))
    inputs = model.processor(text=[prompt], audio=[wave], return_tensors="pt", padding=True).to(dtype)
    thinker = model.model.thinker
    with torch.no_grad():
        encoder = _time(lambda: thinker.get_audio_features(
            inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]))

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    began = time.perf_counter()
    inputs = model.processor(text=[prompt], audio=[wave], return_tensors="pt", padding=True).to(dtype)
    model.model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                         logits_processor=LogitsProcessorList([Clock()]))
    return _figures(loaded_at, first_token_at, frontend, encoder, began, stamps, args.steps,
                    inputs["input_ids"].shape[1], len(wave) / 16000)


def _time(stage) -> float:
    """Seconds of one run of `stage`, after the cold first call has warmed every stage."""
    began = time.perf_counter()
    stage()
    return time.perf_counter() - began


def _figures(loaded_at, first_token_at, frontend, encoder, began, stamps, steps, prompt_tokens, seconds) -> dict:
    """Figures from one forced, warm generation (`stamps`: the time each token was chosen), with
    the wall-clock times every weight was ready and the cold first call had its token."""
    steps_s = np.diff(stamps[: steps + 1])
    return {
        "loaded_at": loaded_at, "frontend": frontend, "encoder": encoder,
        "ttft": stamps[0] - began,  # the frontend, the encoder and the prefill
        "decode_ms": 1000 * float(np.median(steps_s)),
        "e2e": stamps[-1] - began, "rtf": (stamps[-1] - began) / seconds,
        "prompt_tokens": prompt_tokens, "tokens": len(stamps),
        "first_token_at": first_token_at,
    }


def measure_bandwidth(threads: int, gigabytes: float = 1.0) -> float:
    """Read bandwidth in GB/s: the best of ten threaded reductions (sum, max) over 1 GB.

    The best, because on a shared machine every disturbance only makes a run slower, and the
    floor must not be set by a disturbed run.
    """
    data = np.ones(int(gigabytes * 1e9 / 4), dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for reduce in (np.sum, np.max) * 5:
            began = time.perf_counter()
            list(pool.map(reduce, parts))
            best = min(best, time.perf_counter() - began)
    return data.nbytes / best / 1e9


def bytes_per_token(preset: str, weight_bytes: int, cache_bytes: int, context: int) -> float:
    """Bytes one decode step must read: decoder layers, final norm and head, plus the KV cache."""
    from qasr.models.checkpoint import parameter_counts
    from qasr.models.config import parse_config
    from qasr.models.synthetic import PRESETS, official_config

    config = parse_config(official_config(PRESETS[preset]))
    counts = parameter_counts(config)
    head = counts["head"] or counts["embedding"]  # a tied head reads the embedding table
    t = config.text
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * context
    return weight_bytes * (counts["decoder"] + head) + cache_bytes * kv


def report(rows: list[dict], bandwidth: float, args) -> str:
    lines = [
        "## Against the official transformers backend",
        "",
        f"{datetime.date.today()}, `python scripts/bench.py --models {' '.join(args.models)} --seconds "
        f"{' '.join(f'{s:g}' for s in args.seconds)} --repeats {args.repeats}"
        + (f" --skip {' '.join(args.skip)}" if args.skip else "") + f"` ({args.threads} threads)",
        "",
        machine(),
        "",
        "Random-weight checkpoints of the released shapes; real speech; each figure the median of "
        f"{args.repeats} fresh processes, spread min-max in brackets. Generation forced to "
        f"{TOKENS_PER_SECOND} tokens per second of audio on every system. load = process start to every "
        "weight ready (imports included; qasr loads its decoder while the audio is encoded); cold = process "
        "start to the first token of the first call; the other figures are warm, after that call; "
        "ttft = frontend + encoder + prefill; decode = median of "
        f"{args.steps} steps; x = ratio to official fp32 (below 1: faster or smaller).",
        "",
        "| model | audio | system | load s | cold s | frontend s | encoder s | ttft s | decode ms/tok | e2e RTF "
        "| peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peer = next(r for r in rows if r["model"] == row["model"] and r["seconds"] == row["seconds"]
                    and r["system"] == "official-fp32") if "official-fp32" in args.systems else None
        lines.append(_table_row(row, peer))
    lines += ["", *floor_lines(rows, bandwidth, args)]
    return "\n".join(lines)


METRICS = ("load", "cold_start", "frontend", "encoder", "ttft", "decode_ms", "rtf", "peak_rss_gb")


def _table_row(row: dict, peer: dict | None) -> str:
    cells = []
    for key in METRICS:
        values = [run[key] for run in row["runs"]]
        median = statistics.median(values)
        cell = f"{median:.3g} [{min(values):.3g}-{max(values):.3g}]"
        if peer is not None and peer is not row:
            cell += f" x{median / statistics.median(run[key] for run in peer['runs']):.2f}"
        cells.append(cell)
    return f"| {row['model']} | {row['seconds']:g} s | {row['system']} | " + " | ".join(cells) + " |"


def floor_lines(rows: list[dict], bandwidth: float, args) -> list[str]:
    """The bandwidth floor per decoded token, the fraction each system reaches, and paper floors."""
    lines = [
        "### The physical floor",
        "",
        f"Measured read bandwidth: {bandwidth:.1f} GB/s (best threaded sum or max over 1 GB, {args.threads} "
        "threads, before and after the runs). A decode step "
        "reads every decoder weight and the head once, plus the KV cache of its context; floor = bytes / "
        "bandwidth; reached = floor / measured decode time.",
        "",
        "| model | audio | system | weights | context | GB per token | floor ms | reached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sizes = {"official-fp32": (4, 4, "fp32"), "official-bf16": (2, 2, "bf16"), "qasr-onnxruntime": (4, 4, "fp32")}
    for row in rows:
        weight_bytes, cache_bytes, name = sizes[row["system"]]
        context = row["runs"][0]["prompt_tokens"] + args.steps // 2
        total = bytes_per_token(row["model"], weight_bytes, cache_bytes, context)
        floor_ms = 1000 * total / (bandwidth * 1e9)
        decode = statistics.median(run["decode_ms"] for run in row["runs"])
        lines.append(f"| {row['model']} | {row['seconds']:g} s | {row['system']} | {name} | {context} | "
                     f"{total / 1e9:.2f} | {floor_ms:.0f} | {floor_ms / decode:.0%} |")
    lines += ["", "On paper, bf16 engines, 500 tokens of context (weights + KV cache at peak bandwidth):", "",
              "| device | GB/s | " + " | ".join(f"{m} ms/token" for m in ("0.6b", "1.7b")) + " |",
              "|---|---|---|---|"]
    for device, gbs in DEVICES.items():
        floors = [1000 * bytes_per_token(m, 2, 2, 500) / (gbs * 1e9) for m in ("0.6b", "1.7b")]
        lines.append(f"| {device} | {gbs:g} | " + " | ".join(f"{f:.2f}" for f in floors) + " |")
    return lines


def _progress_line(row: dict) -> str:
    run = row["runs"][len(row["runs"]) // 2]
    return (f"{row['model']} {row['seconds']:g}s {row['system']}: ttft {run['ttft']:.2f}s, decode "
            f"{run['decode_ms']:.0f} ms/tok, rtf {run['rtf']:.2f}, peak {run['peak_rss_gb']:.2f} GB")


def machine() -> str:
    """CPU model, cores, memory, load, and the versions that matter, in one line."""
    import onnxruntime

    cpu, flags = cpu_info()
    cpu += f" ({widest_simd(flags)})"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    try:
        import torch
        import transformers

        versions += [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    except ImportError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB (load average at start {load}); {', '.join(versions)}"


def publish(text: str, begin: str, end: str, write: bool = True) -> None:
    """A benchmark's section: printed, and (unless `write` is off: --no-write) put into docs/benchmarks.md."""
    print(text)
    if write:
        write_section(DOC, begin, end, text)


def write_section(doc: Path, begin: str, end: str, text: str) -> None:
    """Replace the text between two markers in `doc` (appending the section if it is new)."""
    current = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    section = f"{begin}\n{text}\n{end}"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + section + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(current, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
