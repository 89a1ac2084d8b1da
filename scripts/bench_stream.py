#!/usr/bin/env python
"""Time `Transcriber.stream` against the naive official re-feed and antirez/qwen-asr --stream.

    python scripts/bench_stream.py [--bundle B ...] [--checkpoint C] [--seconds 336]
        [--peer-seconds 120] [--peer ../qwen-asr/qwen_asr] [--qasr-only] [--no-write]

One process, one machine, the same speech (the tests/data English and Chinese clips in turn), 2
threads everywhere, 2 s chunks, 12 new tokens forced every step (end-of-sequence ignored; a real
model writes about that much per 2 s), for each bundle (default: the fp32 bundle `qasr bench`
prepares and its int4 copy, as scripts/bench_batch.py makes them):
- qasr: the incremental Stream with its default segments, fed the whole stream; every step timed.
- naive re-feed: what the official streaming_transcribe computes per step, by this runtime: all
  the audio so far encoded again and the whole prompt prefilled (with the text prefix the
  policy would carry by then, 7 ids a step), then 12 tokens. Its cost depends only on how far
  into the stream the step is, so it is timed at the marks only.
And once, on the checkpoint's bf16 safetensors: antirez/qwen-asr `--stream` (pure C), per step
from its --debug lines (encoder + prefill + decode ms), on the first --peer-seconds of the audio.
--qasr-only times qasr's Stream alone, for streams too long to time the peers on (an hour: is
memory flat?), into a section of its own.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_batch import BUNDLES, CACHE, ensure_bundle, precision  # noqa: E402

from qasr.bench.docs import DOC, write_section  # noqa: E402
from qasr.bench.harness import describe_machine, measure_bandwidth  # noqa: E402
from qasr.memory import rss_gb  # noqa: E402
from qasr.runtime.backends.onnxruntime_cpu import share_threads  # noqa: E402
from qasr.runtime.audio import SAMPLE_RATE  # noqa: E402
from qasr.runtime.batch import greedy_decode  # noqa: E402
from qasr.runtime.embed import embed_audio  # noqa: E402
from qasr.runtime.prompt import prompt_ids  # noqa: E402
from qasr.runtime.transcribe import Transcriber  # noqa: E402

# with peers, and qasr alone (--qasr-only, for streams too long to time the peers on): two sections
SECTIONS = {False: ("## Streaming", "stream"), True: ("## A long stream, qasr alone", "stream-long")}
TOKENS = 12
MARKS = (30, 120, 300)  # seconds into the stream; a mark's figures are over the 20 s before it
SPAN = 20


def speech(seconds: float) -> np.ndarray:
    clips = [sf.read(ROOT / "tests" / "data" / name, dtype="float32")[0] for name in ("en_16k_s16.wav", "zh_16k_f32_loud.wav")]
    parts, total = [], 0
    while total < seconds * SAMPLE_RATE:
        parts.append(clips[len(parts) % 2])
        total += len(parts[-1])
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_qasr(model: Transcriber, wave: np.ndarray) -> dict:
    """Per step (audio end s, compute s) and, in a list beside it, the process's resident GB after
    it; the finalisation latency, the stream's RTF and its stage seconds."""
    stream = model.stream(max_new_tokens=TOKENS)
    steps, memory, chunk = [], [], 2 * SAMPLE_RATE
    for begin in range(0, len(wave), chunk):
        for event in stream.feed(wave[begin : begin + chunk]):
            steps.append((event.audio_seconds if not event.final else len(wave) / SAMPLE_RATE, event.compute_seconds))
            memory.append(rss_gb())
    start = time.perf_counter()
    stream.finish()
    final = time.perf_counter() - start
    rtf = (sum(s for _, s in steps) + final) / (len(wave) / SAMPLE_RATE)
    return {"steps": steps, "memory": memory, "final": final, "rtf": rtf, "stages": stream.timings}


def naive_step(model: Transcriber, wave: np.ndarray, seconds: float) -> float:
    """One official re-feed step at `seconds`: encode everything, prefill everything, 12 tokens."""
    start = time.perf_counter()
    embeds = embed_audio(model.backend, wave[: int(seconds * SAMPLE_RATE)], model.window_frames)
    steps = int(seconds // 2)
    filler = model.tokenizer.encode("language English<asr_text>" + "the quick brown fox jumps over it " * 400)
    prefix = filler[: max(0, 7 * (steps - 2))]
    prompt = prompt_ids(model.tokenizer, "", None, len(embeds)) + prefix
    greedy_decode(model.backend, prompt, embeds, model.audio_token, TOKENS, ())
    return time.perf_counter() - start


def run_peer(peer: str, checkpoint: str, wave: np.ndarray) -> tuple[list[tuple[float, float]], float]:
    """antirez --stream: [(audio end s, compute s)] per step from --debug, and its reported RTF."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "speech.wav"
        sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
        done = subprocess.run([peer, "-d", checkpoint, "-i", str(path), "--stream", "--stream-max-new-tokens",
                               str(TOKENS), "-t", "2", "--debug"], capture_output=True, check=True)
    log = done.stderr.decode(errors="replace")  # random weights write any bytes
    steps, at, total = [], 0.0, 0.0
    for line in log.splitlines():
        if m := re.search(r"Encoder: .* 0\.0-([\d.]+) s .*?([\d.]+) ms\)", line):
            if total:
                steps.append((at, total))
            at, total = float(m.group(1)), float(m.group(2)) / 1000
        elif m := re.search(r"(?:Prefill|Decode): .*?\(([\d.]+) ms", line):
            total += float(m.group(1)) / 1000
    steps.append((at, total))
    rtf = re.search(r"Audio: ([\d.]+) s processed in ([\d.]+) s", log)
    return steps, float(rtf.group(2)) / float(rtf.group(1)) if rtf else float("nan")


def at_mark(steps: list[tuple[float, float]], mark: float) -> list[float]:
    return [s for t, s in steps if mark - SPAN < t <= mark]


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):.2f} / {percentile(values, 95):.2f} ({len(values)})"


def whole_row(name: str, steps: list[tuple[float, float]], seconds: float, final: float, rtf: float) -> str:
    """The whole stream's per-step figures: what "below 2 s at p95, and flat" is judged on."""
    times = [s for _, s in steps]
    first = statistics.median([s for t, s in steps if t <= 60])
    last = statistics.median([s for t, s in steps if t > seconds - 60])
    return (f"| {name} | {seconds:g} s, {len(times)} | {percentile(times, 50):.2f} | {percentile(times, 95):.2f} | "
            f"{max(times):.2f} | {first:.2f} / {last:.2f} (x{last / first:.2f}) | {final:.2f} | {rtf:.2f} |")


def measure_bundle(bundle: pathlib.Path, wave: np.ndarray, args) -> dict:
    """qasr's Stream on the whole stream, and unless --qasr-only the naive re-feed at the marks."""
    model = Transcriber.load(bundle, backend="onnxruntime", threads=2)
    model.eos_ids = ()  # force TOKENS new tokens every step
    model.transcribe((np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE), max_new_tokens=1)  # the decoder loads
    weights = precision(bundle)
    run = {"name": f"qasr Stream, {weights}", "precision": weights, **run_qasr(model, wave)}
    print(whole_row(run["name"], run["steps"], args.seconds, run["final"], run["rtf"]), flush=True)
    naive = {}
    if not args.qasr_only:
        naive = {m: [naive_step(model, wave, m - 2 * i) for i in range(args.naive_repeats)] for m in marks(args)}
        print("naive", naive, flush=True)
    return {**run, "naive": naive}


def memory_cell(run: dict) -> str:
    """What flat memory is judged on: the first minute's most against the last step and the whole stream's most."""
    first = max(gb for (t, _), gb in zip(run["steps"], run["memory"]) if t <= 60)
    return f"{first:.2f} / {run['memory'][-1]:.2f} / {max(run['memory']):.2f}"


def marks(args) -> list[int]:
    return [m for m in MARKS if m <= args.seconds]


def command() -> str:
    """This run's command line, with the home folder as ~ so the docs name no path of this machine."""
    return " ".join(["python scripts/bench_stream.py", *sys.argv[1:]]).replace(str(pathlib.Path.home()), "~")


def report(runs: list[dict], peer: tuple | None, args, bandwidth: float) -> str:
    lines = [
        SECTIONS[args.qasr_only][0], "",
        f"{datetime.date.today().isoformat()}, `{command()}`", "",
        f"{describe_machine()}; read bandwidth {bandwidth:.1f} GB/s (`qasr.bench.harness.measure_bandwidth`, 2 threads).", "",
        f"Full-size random Qwen3-ASR-0.6B, 2 threads, {args.seconds:g} s of real speech fed in 2 s chunks as fast "
        f"as it computes (after one warm-up call, so the decoder's weights are loaded), {TOKENS} new tokens forced a "
        "step, default segments (30 s). Random weights: the text is noise, the cost is the real model's.", "",
        "The whole stream, every step (each chunk and the segment cuts; the flush is the finalisation column):", "",
        "| system | audio, steps | step p50 s | step p95 s | step max s | first / last minute median s "
        "| finalisation s | stream RTF |", "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [whole_row(run["name"], run["steps"], args.seconds, run["final"], run["rtf"]) for run in runs]
    if peer:
        peer_steps, peer_rtf = peer
        lines.append(whole_row("antirez/qwen-asr --stream, bf16", peer_steps, args.peer_seconds,
                               peer_steps[-1][1], peer_rtf))
    lines += ["", "Where qasr's time went (whole stream, s): " + "; ".join(
        f"{run['precision']}: " + ", ".join(f"{k} {v:.1f}" for k, v in run["stages"].items()) for run in runs) + "."]
    lines += ["", "The process's resident memory (GB) after the first minute / at the end / its most: " + "; ".join(
        f"{run['precision']}: {memory_cell(run)}" for run in runs) + "."]
    if args.qasr_only:
        return "\n".join(lines)
    shown = marks(args)
    lines += ["", f"Per step at marks into the stream (p50 / p95 s over the steps in the {SPAN} s before each mark, "
              "with their count):", "",
              "| system | " + " | ".join(f"at {m} s" for m in shown) + " |", "|---|" + "---:|" * len(shown)]
    for run in runs:
        lines.append(f"| {run['name']} | " + " | ".join(cell(at_mark(run["steps"], m)) for m in shown) + " |")
    for run in runs:
        lines.append(f"| naive official re-feed (this runtime), {run['precision']} | "
                     + " | ".join(cell(run["naive"][m]) for m in shown) + " |")
    if peer:
        lines.append("| antirez/qwen-asr --stream, bf16 | " + " | ".join(cell(at_mark(peer[0], m)) for m in shown) + " |")
    lines += ["", f"The naive re-feed is timed {args.naive_repeats} times at each mark (its cost depends only on the "
              f"mark). antirez ran on the first {args.peer_seconds:g} s only, to keep the run short; its per-step "
              "figures come from its --debug lines, its finalisation is its last step, its RTF its own report."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=pathlib.Path, nargs="+", default=list(BUNDLES),
                        help="ASR bundles (default: the fp32 one of `qasr bench` and its int4 copy, made when missing)")
    parser.add_argument("--checkpoint", default=str(CACHE / "qwen3-asr-0.6b"), help="safetensors for antirez")
    parser.add_argument("--seconds", type=float, default=336)
    parser.add_argument("--peer-seconds", type=float, default=120)
    parser.add_argument("--peer", default=str(ROOT.parent / "qwen-asr" / "qwen_asr"),
                        help="antirez/qwen-asr built with `make blas` (default: a checkout beside this repo)")
    parser.add_argument("--naive-repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--qasr-only", action="store_true", help="time qasr's Stream alone (no peers)")
    args = parser.parse_args()
    share_threads(2)  # one pool for every session, as in `qasr stream` and the server
    wave = speech(args.seconds)
    bandwidth = measure_bandwidth(2)
    runs = []
    for bundle in args.bundle:
        ensure_bundle(bundle)
        runs.append(measure_bundle(bundle, wave, args))
        gc.collect()  # the last bundle's sessions go before the next one loads
    peer = None
    if not args.qasr_only:
        peer = run_peer(args.peer, args.checkpoint, wave[: int(args.peer_seconds * SAMPLE_RATE)])
    text = report(runs, peer, args, max(bandwidth, measure_bandwidth(2)))
    print(text)
    if not args.no_write:
        marker = SECTIONS[args.qasr_only][1]
        write_section(DOC, f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->", text)


if __name__ == "__main__":
    main()
