#!/usr/bin/env python
"""Time `Transcriber.stream` against the naive official re-feed and antirez/qwen-asr --stream.

    python scripts/bench_stream.py BUNDLE CHECKPOINT [--seconds 300]
        [--peer-seconds 120] [--peer ../qwen-asr/qwen_asr] [--no-write]

One process, one machine, the same speech (the tests/data English and Chinese clips in turn), 2
threads everywhere, 2 s chunks, 12 new tokens forced every step (end-of-sequence ignored; a real
model writes about that much per 2 s):
- qasr: the incremental Stream with its default segments, fed the whole stream; every step timed.
- naive re-feed: what the official streaming_transcribe computes per step, by this runtime: all
  the audio so far encoded again and the whole prompt prefilled (with the text prefix the
  policy would carry by then, 7 ids a step), then 12 tokens. Its cost depends only on how far
  into the stream the step is, so it is timed at the marks only.
- antirez/qwen-asr `--stream` (pure C, bf16 weights from the same safetensors), per step from its
  --debug lines (encoder + prefill + decode ms), on the first --peer-seconds of the same audio.
"""

from __future__ import annotations

import argparse
import datetime
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

from qasr.bench import DOC, machine, write_section  # noqa: E402
from qasr.runtime.audio import SAMPLE_RATE  # noqa: E402
from qasr.runtime.decode import greedy_decode  # noqa: E402
from qasr.runtime.embed import embed_audio  # noqa: E402
from qasr.runtime.prompt import prompt_ids  # noqa: E402
from qasr.runtime.transcribe import Transcriber  # noqa: E402

BEGIN, END = "<!-- stream:begin -->", "<!-- stream:end -->"
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


def run_qasr(model: Transcriber, wave: np.ndarray) -> tuple[list[tuple[float, float]], float, float]:
    """[(audio end s, compute s)] per step, the finalisation latency, the stream's RTF."""
    stream = model.stream(max_new_tokens=TOKENS)
    steps, chunk = [], 2 * SAMPLE_RATE
    for begin in range(0, len(wave), chunk):
        for event in stream.feed(wave[begin : begin + chunk]):
            steps.append((event.audio_seconds if not event.final else len(wave) / SAMPLE_RATE, event.compute_seconds))
    start = time.perf_counter()
    stream.finish()
    final = time.perf_counter() - start
    print("qasr stages (s, whole stream):", {k: round(v, 1) for k, v in stream.timings.items()}, flush=True)
    return steps, final, (sum(s for _, s in steps) + final) / (len(wave) / SAMPLE_RATE)


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


def summary(steps: list[tuple[float, float]], seconds: float, final: float, rtf: float) -> str:
    """The whole stream's per-step figures: what "below 2 s at p95, and flat" is judged on."""
    times = [s for _, s in steps]
    first = statistics.median([s for t, s in steps if t <= 60])
    last = statistics.median([s for t, s in steps if t > seconds - 60])
    return (f"{len(times)} steps: p50 {percentile(times, 50):.2f} s, p95 {percentile(times, 95):.2f} s, "
            f"max {max(times):.2f} s; first minute median {first:.2f} s, last minute {last:.2f} s "
            f"(x{last / first:.2f}); finalisation {final:.2f} s; stream RTF {rtf:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("checkpoint")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--peer-seconds", type=float, default=120)
    parser.add_argument("--peer", default=str(ROOT.parent / "qwen-asr" / "qwen_asr"),
                        help="antirez/qwen-asr built with `make blas` (default: a checkout beside this repo)")
    parser.add_argument("--naive-repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--qasr-only", action="store_true",
                        help="time qasr's Stream alone and print the whole stream's figures (no peers, no table)")
    args = parser.parse_args()
    wave = speech(args.seconds)
    model = Transcriber.load(args.bundle, backend="onnxruntime", threads=2)
    model.eos_ids = ()  # force TOKENS new tokens every step
    model.transcribe((np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE), max_new_tokens=1)  # the decoder loads
    steps, final, rtf = run_qasr(model, wave)
    print("qasr", cell(at_mark(steps, 30)), cell(at_mark(steps, 120)), cell(at_mark(steps, 300)), final, rtf, flush=True)
    if args.qasr_only:
        print(summary(steps, args.seconds, final, rtf))
        return
    marks = [m for m in MARKS if m <= args.seconds]
    naive = {m: [naive_step(model, wave, m - 2 * i) for i in range(args.naive_repeats)] for m in marks}
    print("naive", naive, flush=True)
    peer_steps, peer_rtf = run_peer(args.peer, args.checkpoint, wave[: int(args.peer_seconds * SAMPLE_RATE)])
    print("peer", cell(at_mark(peer_steps, 30)), cell(at_mark(peer_steps, 120)), peer_rtf, flush=True)
    minute = [s for t, s in steps if t <= 60], [s for t, s in steps if t > args.seconds - 60]
    header = (f"## Streaming\n\n{datetime.date.today().isoformat()}, `python "
              f"scripts/bench_stream.py {' '.join(sys.argv[1:])}`\n\n{machine()}.\n")
    rows = ["| system | " + " | ".join(f"step p50 / p95 s at {m} s (steps)" for m in marks)
            + " | finalisation s | stream RTF |", "|---|" + "---:|" * (len(marks) + 2)]
    rows.append("| qasr Stream (incremental, segments of 30 s) | " + " | ".join(cell(at_mark(steps, m)) for m in marks)
                + f" | {final:.2f} | {rtf:.2f} |")
    rows.append("| naive official re-feed (this runtime) | " + " | ".join(cell(naive[m]) for m in marks)
                + f" | {statistics.median(naive[marks[-1]]):.2f} | {statistics.median(naive[marks[-1]]) / 2:.2f} |")
    rows.append("| antirez/qwen-asr --stream | " + " | ".join(cell(at_mark(peer_steps, m)) for m in marks)
                + f" | {peer_steps[-1][1]:.2f} | {peer_rtf:.2f} |")
    text = header + "\n" + "\n".join(rows) + (
        f"\n\nFull-size random Qwen3-ASR-0.6B (fp32 bundle for qasr, the bf16 safetensors for antirez), 2 threads, "
        f"{args.seconds:g} s of real speech fed in 2 s chunks as fast as it computes (after one warm-up call, "
        f"so the decoder's weights are loaded), {TOKENS} new tokens forced a step. A mark's figures are over the steps in the {SPAN} s before it. First minute median "
        f"{statistics.median(minute[0]):.2f} s, last minute {statistics.median(minute[1]):.2f} s "
        f"(x{statistics.median(minute[1]) / statistics.median(minute[0]):.2f}). The naive re-feed is timed "
        f"{args.naive_repeats} times at each mark (its cost depends only on the mark); its finalisation is one "
        "more such step and its RTF is a step's cost over the 2 s it covers, at the last mark. antirez ran "
        f"on the first {args.peer_seconds:g} s only, to keep the run short; its "
        "per-step figure from its --debug lines, its finalisation its last step, its RTF its own report. "
        "Random weights: the text is noise, the cost is the real model's."
    )
    print(text)
    if not args.no_write:
        write_section(DOC, BEGIN, END, text)


if __name__ == "__main__":
    main()
