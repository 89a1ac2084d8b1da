"""One ONNX Runtime thread pool per process (qasr.share_threads) against a pool per session.

    python scripts/bench_threads.py --bundle B [--seconds 120] [--files 8] [--rounds 2] [--no-write]

A recording alternates graphs (encoder, projector, decoder), and with a pool per session the
workers of the graph that just ran spin on the cores the next one needs. Two workloads where the
graphs alternate most, each in fresh processes, the two settings taking turns for `--rounds`
rounds so that other jobs on a shared machine slow both alike (the setting is the environment's
QASR_THREAD_POOL, which is all that differs):
- a stream: `--seconds` of real speech in 2 s chunks through `Transcriber.stream`, as
  scripts/bench_stream.py feeds it (12 tokens forced a step): step p50 / p95 and stream RTF;
- `qasr transcribe` of a 10 s recording given `--files` times at `--batch-size 4` (new recordings are
  encoded between the decode steps of the others), 40 tokens each: wall seconds.
2 threads. Writes the "One thread pool per process" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_batch import precision  # noqa: E402  # scripts/ is this script's own directory

from qasr.bench.docs import publish  # noqa: E402
from qasr.bench.harness import describe_machine, speech_file  # noqa: E402
from qasr.bench.workers import json_from_child  # noqa: E402
from qasr.runtime.backends.onnxruntime_cpu import PER_SESSION  # noqa: E402

BEGIN, END = "<!-- threads:begin -->", "<!-- threads:end -->"
SETTINGS = {"one pool per process": None, "a pool per session": "per-session"}


def main() -> int:
    args = parser().parse_args()
    if args.worker:
        print(json.dumps(stream_worker(args.bundle, args.seconds)), flush=True)
        return 0
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as tmp:
        files = [speech_file(Path(tmp), 10)] * args.files  # one recording, given that many times
        rows: dict[str, dict[str, list]] = {name: {"stream": [], "batch": []} for name in SETTINGS}
        for turn in range(args.rounds):
            for name, value in SETTINGS.items():
                worker = [sys.executable, __file__, "--worker", "--bundle", str(args.bundle), "--seconds",
                          str(args.seconds)]
                rows[name]["stream"].append(json_from_child(worker, "the stream worker", env=environment(value)))
                rows[name]["batch"].append(batch(args.bundle, files, value))
                print(f"round {turn + 1}, {name}: {rows[name]['stream'][-1]}, {rows[name]['batch'][-1]:.2f} s",
                      file=sys.stderr, flush=True)
    publish(report(rows, machine, args), BEGIN, END, write=not args.no_write)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="an ASR bundle (the int4 fused one, say)")
    p.add_argument("--seconds", type=float, default=120, help="the stream's length")
    p.add_argument("--files", type=int, default=8, help="recordings in the batched transcription")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md as it is")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def environment(value: str | None) -> dict:
    env = {key: item for key, item in os.environ.items() if key != PER_SESSION}
    return env | ({PER_SESSION: value} if value else {}) | {"PYTHONPATH": str(ROOT)}


def stream_worker(bundle: Path, seconds: float) -> dict:
    """What scripts/bench_stream.py times for one bundle, in a process whose pools the environment sets."""
    from bench_stream import run_qasr, speech  # scripts/ is this script's own directory

    from qasr import Transcriber, share_threads
    from qasr.runtime.audio import SAMPLE_RATE

    share_threads(2)  # as `qasr stream` does; a no-op under QASR_THREAD_POOL=per-session
    model = Transcriber.load(bundle, backend="onnxruntime", threads=2)
    model.eos_ids = ()  # 12 new tokens every step, as bench_stream forces
    model.transcribe((np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE), max_new_tokens=1)  # the decoder loads
    run = run_qasr(model, speech(seconds))
    times = [step for _, step in run["steps"]]
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)), "rtf": run["rtf"]}


def batch(bundle: Path, files: list[Path], value: str | None) -> float:
    """Wall seconds of `qasr transcribe FILES --batch-size 4`, 40 tokens each."""
    argv = ["-m", "qasr", "transcribe", *map(str, files), "--model", str(bundle), "--threads", "2",
            "--max-new-tokens", "40", "--batch-size", "4"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=environment(value))
    if done.returncode:
        raise SystemExit(f"qasr transcribe failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def report(rows: dict, machine: str, args) -> str:
    med = {name: {key: float(np.median([r[key] for r in row["stream"]])) for key in ("p50", "p95", "rtf")}
           | {"batch": float(np.median(row["batch"]))} for name, row in rows.items()}
    lines = ["## One thread pool per process", "",
             f"{datetime.date.today()}, `python scripts/bench_threads.py --bundle {args.bundle.name} --seconds "
             f"{args.seconds:g} --files {args.files} --rounds {args.rounds}`", "", machine, "",
             f"Full-size random Qwen3-ASR-0.6B, {precision(args.bundle)}, 2 threads, fresh processes, the two settings "
             f"taking turns for {args.rounds} rounds (medians). Stream: {args.seconds:g} s of speech in 2 s chunks, 12 "
             f"tokens forced a step. Batch: `qasr transcribe` of a 10 s recording given {args.files} times, "
             "`--batch-size 4 --max-new-tokens 40`, wall clock with the process start.", "",
             "| ONNX Runtime threads | stream step p50 s | stream step p95 s | stream RTF | batch s |",
             "|---|---:|---:|---:|---:|"]
    shared, alone = med["one pool per process"], med["a pool per session"]
    for name, figures in med.items():
        lines.append(f"| {name} | {figures['p50']:.2f} | {figures['p95']:.2f} | {figures['rtf']:.2f} | "
                     f"{figures['batch']:.2f} |")
    lines += ["", f"One pool: stream steps x{shared['p50'] / alone['p50']:.2f} at the median and "
              f"x{shared['p95'] / alone['p95']:.2f} at p95, the batch x{shared['batch'] / alone['batch']:.2f}, "
              "against a pool per session (ONNX Runtime's default; `QASR_THREAD_POOL=per-session`). Ids and text "
              "are the same either way (tests/test_threads.py)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
