"""Batched decoding on the CPU: the numbers behind docs/benchmarks.md's "Batched decoding" section.

    python scripts/bench_batch.py [--bundle B ...] [--threads 2] [--no-write]

Full-size random Qwen3-ASR-0.6B (the checkpoint and fp32 bundle `qasr bench` prepares in
~/.cache/qasr-bench) and its int4 copy (int4 decoder, int8 encoder: `qasr export --weights int4
--encoder-weights int8`, made there once), ONNX Runtime; for each bundle:

1. decode throughput: tokens per second summed over the batch at batch 1, 2, 4 and 8, the rows
   prefilled with 10 s recordings first (each step reads their caches as a real batch does);
2. end to end: 8 recordings of 10 s one at a time (`transcribe`) against
   `transcribe_many(batch_size=8)`, each forced to 64 tokens (end-of-sequence ids cleared, since a
   random model stops anywhere), checking the ids are the same, with each side's peak memory
   (VmHWM; each side runs in its own process after a warm-up call, so neither carries the other's
   peak) and the KV cache the batch held.

Random weights give flat logits: these are speed and memory figures, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "qasr-bench"
BUNDLES = (CACHE / "qwen3-asr-0.6b-bundle", CACHE / "int4-0.6b-bundle")
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Batched decoding"
BEGIN, END = "<!-- batch:begin -->", "<!-- batch:end -->"
RECORDINGS, SECONDS, TOKENS = 8, 10.0, 64
BATCHES, STEPS = (1, 2, 4, 8), 32
STAGES = ("frontend", "encoder", "prefill", "decode")
REPEATS = 3  # runs per measurement, alternating sides; the fastest counts (the machine is shared)


def recordings() -> list[np.ndarray]:
    """8 different 10 s clips of real speech, cut at different offsets of the test recordings."""
    import soundfile as sf

    clips = [sf.read(ROOT / "tests" / "data" / name, dtype="float32")[0]
             for name in ("en_16k_s16.wav", "zh_16k_f32_loud.wav")]
    speech = np.concatenate([clip / max(1.0, float(np.abs(clip).max())) for clip in clips] * 8)
    n = int(SECONDS * 16000)
    return [speech[i * n // 3 : i * n // 3 + n].copy() for i in range(RECORDINGS)]


def ensure_bundle(bundle: Path) -> None:
    """The fp32 bundle from `qasr bench`'s random checkpoint, or (named int4-*) its int4 copy."""
    from qasr.bench.harness import prepare
    from qasr.errors import BundleError
    from qasr.export.quantize import quantize_bundle
    from qasr.runtime.bundle import Bundle

    try:
        Bundle.load(bundle)
        return
    except BundleError:
        pass
    _, fp32 = prepare("0.6b", CACHE)  # the random checkpoint and its fp32 bundle, made once
    if bundle == fp32:
        return
    if not bundle.name.startswith("int4-"):
        sys.exit(f"bench_batch: {bundle} is not a bundle")
    quantize_bundle(fp32, bundle, "int4", "int8", progress=lambda line: print(f"  {line}", file=sys.stderr))


def precision(bundle: Path) -> str:
    """How the bundle's weights are stored, as `qasr export` names it."""
    from qasr.runtime.bundle import Bundle

    loaded = Bundle.load(bundle)
    manifest, fused = loaded.manifest, " (fused)" if loaded.fused_decoder else ""
    weights = manifest.get("weights") or {}
    if not weights:
        return manifest["precision"] + fused
    encoder = f"int{weights['encoder']['bits']}" if "encoder" in weights else "fp32"
    return f"{manifest['precision']} decoder{fused}, {encoder} encoder"


def load(bundle: Path, threads: int):
    from qasr.runtime.transcribe import Transcriber

    model = Transcriber.load(bundle, backend="onnxruntime", threads=threads)
    model.eos_ids = ()  # forced to the budget: a random model's end-of-sequence id comes anywhere
    model.transcribe((recordings()[0][:16000], 16000), max_new_tokens=2)  # warm-up: the decoder session loads
    return model


def worker_decode(bundle: Path, threads: int) -> dict:
    """Tokens per second of decode steps at each batch size, on rows holding 10 s prompts."""
    from qasr.runtime.batch import BatchDecoder
    from qasr.runtime.decode import Sequence
    from qasr.runtime.prompt import prompt_ids

    model = load(bundle, threads)
    sequences = []
    for wave in recordings():
        embeds = model.encode((wave, 16000))
        prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
        sequences.append(Sequence(prompt, embeds, model.audio_token, TOKENS, ()))  # regions as end to end
    engine = BatchDecoder(model.backend, max_batch=max(BATCHES))
    for sequence in sequences:
        engine.add(sequence)
    engine.step()  # admits and prefills all eight, then one step
    starts = np.array([engine.starts[id(s)] for s in sequences])
    first, ids = np.array([s.position for s in sequences]), np.array([s.token for s in sequences])
    rates: dict[int, dict] = {}
    for _ in range(REPEATS):  # each sweep rewrites the same cache rows (STEPS stay inside the regions)
        for batch in BATCHES:
            positions = first.copy()
            began = time.perf_counter()
            for _ in range(STEPS):
                ids[:batch] = model.backend.step(ids[:batch], starts[:batch], positions[:batch])
                positions[:batch] += 1
            seconds = time.perf_counter() - began
            if batch not in rates or seconds < rates[batch]["seconds"]:
                rates[batch] = {"seconds": seconds, "tokens_per_s": batch * STEPS / seconds,
                                "step_ms": 1000 * seconds / STEPS}
    return {"rates": rates, "prompt_tokens": len(sequences[0].prompt), "pool_rows": model.backend.reserved,
            "alone_step_ms": alone_step_ms(model, sequences[0])}


def alone_step_ms(model, sequence) -> float:
    """One request in a cache of only its own region: what batch 1 above pays for scoring the
    (masked) regions of the seven others, which a shared cache costs a row left alone."""
    from qasr.runtime.batch import BatchDecoder
    from qasr.runtime.decode import Sequence

    fresh = Sequence(sequence.prompt, sequence.audio_embeds, model.audio_token, TOKENS, ())
    engine = BatchDecoder(model.backend, max_batch=1)
    engine.add(fresh)
    engine.step()
    began = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
    return 1000 * (time.perf_counter() - began) / STEPS


def worker_end_to_end(bundle: Path, threads: int, batch_size: int) -> dict:
    from qasr.memory import peak_rss_gb

    model = load(bundle, threads)
    audios = [(wave, 16000) for wave in recordings()]
    began = time.perf_counter()
    if batch_size == 1:
        results = [model.transcribe(audio, max_new_tokens=TOKENS) for audio in audios]
    else:
        results = [r for _, r in model.transcribe_many(audios, batch_size=batch_size, max_new_tokens=TOKENS)]
    seconds = time.perf_counter() - began
    layers, _, _, heads, _, dim = model.backend.cache_shape
    cache_gb = model.backend.reserved * layers * 2 * heads * dim * 4 / 1e9
    stages = {key: sum(r.timings.get(key, 0.0) for r in results) for key in STAGES}
    return {"seconds": seconds, "ids": [r.token_ids for r in results], "peak_gb": peak_rss_gb(), "cache_gb": cache_gb,
            "cache_rows": model.backend.reserved, "row_bytes": layers * 2 * heads * dim * 4, "stages": stages}


def run_worker(bundle: Path, threads: int, *args: str) -> dict:
    from qasr.bench.workers import json_from_child

    command = [sys.executable, __file__, "--bundle", str(bundle), "--threads", str(threads), "--worker", *args]
    return json_from_child(command, f"bench_batch: worker {args}", cwd=ROOT)


def header(bundles: list[Path], threads: int) -> list[str]:
    return [
        SECTION, "",
        f"`python scripts/bench_batch.py` (full-size random Qwen3-ASR-0.6B: "
        f"{', '.join(f'{b.name} ({precision(b)})' for b in bundles)}; ONNX Runtime, {threads} threads, "
        f"this shared 2-core machine, {time.strftime('%Y-%m-%d', time.gmtime())}). Random weights: speed and memory, "
        "not accuracy.",
    ]


def report(bundle: Path, decode: dict, alone: dict, batched: dict) -> str:
    rates = decode["rates"]
    base = rates["1"]["tokens_per_s"]
    differ = sum(a != b for a, b in zip(alone["ids"], batched["ids"]))
    ids = f"identical for all {RECORDINGS}" if not differ else f"different for {differ} of the {RECORDINGS}"
    lines = [
        f"### {precision(bundle)} ({bundle.name})", "",
        f"Decode steps, rows holding 10 s prompts ({decode['prompt_tokens']} tokens) and their own cache regions "
        f"(best of {REPEATS} sweeps of {STEPS} steps):", "",
        "| batch | step (ms) | tokens/s, summed | vs batch 1 |", "|---|---|---|---|",
    ]
    for batch, rate in rates.items():
        lines.append(f"| {batch} | {rate['step_ms']:.0f} | {rate['tokens_per_s']:.1f} | x{rate['tokens_per_s'] / base:.2f} |")
    lines += ["", f"Batch 1 above runs in the shared cache of all eight regions ({decode['pool_rows']} rows, masked "
              f"but scored); alone in a cache of its own region a step takes {decode['alone_step_ms']:.0f} ms."]
    ratio = batched["seconds"] / alone["seconds"]
    lines += [
        "", f"End to end, {RECORDINGS} recordings of {SECONDS:g} s, {TOKENS} tokens each (end-of-sequence ids cleared):", "",
        f"| | wall (s), best of {REPEATS} | runs (s) | {' + '.join(STAGES)} (s) | peak memory (GB) | KV cache held |",
        "|---|---|---|---|---|---|",
        end_to_end_row("one at a time (`transcribe`)", alone),
        end_to_end_row("`transcribe_many(batch_size=8)`", batched),
        "", "Stages are summed over the recordings: in a batch, each recording's decode is the wall time of the "
        "steps it was in, shared with the others.",
        "", f"Batched / one at a time: x{ratio:.2f} wall time (goal <= 0.5); ids "
        f"{ids} recordings. At batch 8 decode throughput is x{rates['8']['tokens_per_s'] / base:.2f} "
        "that of batch 1 (goal >= 5).", "",
        bound_note(rates, alone, batched), "",
        *memory_note(batched["row_bytes"]),
    ]
    return "\n".join(lines)


def bound_note(rates: dict, alone: dict, batched: dict) -> str:
    """What the batched run cannot go below: its per-recording stages plus TOKENS steps at batch 8."""
    serial = sum(batched["stages"][key] for key in ("frontend", "encoder", "prefill"))
    steps = TOKENS * rates["8"]["step_ms"] / 1000
    spread = max(max(run["all"]) / min(run["all"]) for run in (alone, batched))
    return (f"The encoder and the prefills ({serial:.1f} s of the batched run) are per recording and do not batch; "
            f"with the batch-8 step of the first table, {TOKENS} steps take {steps:.1f} s, so on this machine the "
            f"batched run is bounded near x{(serial + steps) / alone['seconds']:.2f} of the one-at-a-time time. "
            f"Runs of the same command on this shared machine varied by up to {spread:.1f}x (the runs column).")


def end_to_end_row(name: str, run: dict) -> str:
    runs = ", ".join(f"{seconds:.1f}" for seconds in run["all"])
    stages = " + ".join(f"{run['stages'][key]:.1f}" for key in STAGES)
    return (f"| {name} | {run['seconds']:.1f} | {runs} | {stages} | {run['peak_gb']:.2f} | "
            f"{run['cache_rows']} rows, {run['cache_gb'] * 1000:.0f} MB |")


def memory_note(row_bytes: int) -> list[str]:
    """Why each request owns a region of one shared cache, with the sizes this model's rows give."""
    from qasr.runtime.batch import ALIGN
    from qasr.runtime.decode import token_budget

    def rows(seconds: float) -> int:  # prompt (17 tokens of template) + 13 audio tokens a second + budget
        return -(-(17 + 13 * int(seconds) + token_budget(seconds)) // ALIGN) * ALIGN

    long, short = rows(1200), rows(SECONDS)
    shared, widest = (long + 7 * short) * row_bytes / 1e9, 8 * long * row_bytes / 1e9
    return [
        f"Memory: a KV cache row is {row_bytes / 1024:.0f} KiB here (the cache is fp32 at every weight "
        "precision). Each request owns a region of one shared cache sized by its own prompt and budget (first fit, sizes rounded up to 64 rows), and the decoder masks "
        "every row outside it, so one 20-minute recording beside seven 10 s ones holds "
        f"{long} + 7 x {short} rows = {shared:.1f} GB, where rows of the batch's longest capacity would take "
        f"8 x {long} = {widest:.1f} GB (computed from the row size). The price is that a step scores the whole "
        "shared cache, masked, for every row (the batch-1 line above); pages gathered per row inside the graph "
        "would instead copy every row's cache at every step on ONNX Runtime.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bundle", type=Path, nargs="+", default=list(BUNDLES),
                        help="ASR bundles (default: the fp32 one of `qasr bench` and its int4 copy, made when missing)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        bundle = args.bundle[0]
        result = worker_decode(bundle, args.threads) if kind == "decode" else \
            worker_end_to_end(bundle, args.threads, int(rest[0]))
        print(json.dumps(result))
        return
    parts = []
    for bundle in args.bundle:
        ensure_bundle(bundle)
        decode = run_worker(bundle, args.threads, "decode")
        runs: dict[str, list[dict]] = {"1": [], "8": []}
        for _ in range(REPEATS):
            for size in runs:
                runs[size].append(run_worker(bundle, args.threads, "end_to_end", size))
        alone, batched = (min(runs[size], key=lambda run: run["seconds"]) for size in runs)
        alone["all"], batched["all"] = ([run["seconds"] for run in runs[size]] for size in runs)
        parts.append(report(bundle, decode, alone, batched))
        print(parts[-1], flush=True)
    section = "\n".join(header(args.bundle, args.threads)) + "\n\n" + "\n\n".join(parts) + "\n"
    print(section)
    if not args.no_write:
        from qasr.bench.docs import write_section

        write_section(DOC, BEGIN, END, section.rstrip("\n"))


if __name__ == "__main__":
    main()
