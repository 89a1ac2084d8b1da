"""Bounded export and the 1.7B beside the 0.6B: the numbers behind docs/benchmarks.md's "The 1.7B on a
small machine" section.

    python scripts/bench_export.py [--models 0.6b 1.7b] [--cache DIR] [--threads 2] [--steps 24] [--rounds 3]
        [--no-write]

For each full-size random checkpoint (made once in the cache by qasr.models.synthetic), every step
in its own process under GNU time (`/usr/bin/time -v`: wall clock and peak resident memory):
- `qasr export CKPT --out fp32` and `qasr export CKPT --out int4 --weights int4 --encoder-weights int8`
  (straight from the checkpoint, no fp32 graph written), then `qasr export fp32 --out int8 --weights
  int8` (from the bundle), and the int4 export again with `--decoder fused`;
- for each bundle (fp32 only where the machine has the memory it takes), a 10 s recording: the first
  call after loading and a second one (their setup and prefill), the forced decode's median
  ms/token, the encoder and the cold start (process start to first result), in a worker process;
- antirez/qwen-asr (bf16, memory-mapped) on the same checkpoint and audio, as scripts/bench_quant.py
  builds and runs it (a checkout beside this repository);
  the workers and the peer take turns for `--rounds` rounds, so that other jobs on a shared machine
  slow every system alike; each figure is the median of the rounds, "x antirez" a ratio of medians;
- the peak memory of `qasr transcribe AUDIO --model BUNDLE` under GNU time, once per bundle: what a
  user's one-shot transcription holds (the peer's peak is its own run's, from wait4: the same measure).
A step whose record is in the cache is not run again (delete DIR/export-bench.json to redo);
`--report` writes the section from the steps recorded so far.
Random weights give flat logits: these are speed and memory figures, not accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The benchmark's own modules (bench_quant, qasr.bench.*) are imported inside the functions that
# use them, never in the worker: they import torch, whose 0.2 GB would count in the run's peak memory.

BEGIN, END = "<!-- export:begin -->", "<!-- export:end -->"
RUN_MEMORY = {"0.6b": 4.5e9, "1.7b": 12e9}  # what the fp32 bundle's run needs free (ONNX Runtime packs every weight)
RUNS = ("fp32", "int8", "int4", "int4-fused")
PEER = "antirez/qwen-asr"
LABELS = {"int8": "int8 (fp32 encoder)", "int4": "int4 (int8 encoder)",
          "int4-fused": "int4, fused decoder (int8 encoder)"}


def main() -> int:
    args = parser().parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]), args)), flush=True)
        return 0
    from bench_quant import build_peer  # scripts/ is this script's own directory

    from qasr.bench.docs import publish
    from qasr.bench.harness import DEFAULT_CACHE, describe_machine, speech_file

    args.cache = args.cache or DEFAULT_CACHE / "export"
    args.cache.mkdir(parents=True, exist_ok=True)
    record_file = args.cache / "export-bench.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    audio = speech_file(args.cache, 10)
    peer = build_peer(args.cache)
    if not args.report:
        record["machine"] = describe_machine()  # the run's own, load at its start included
    for model in [] if args.report else args.models:
        for key, step in steps(model, args.cache, audio, peer, args):
            if key not in record:
                print(f"{key} ...", file=sys.stderr, flush=True)
                record[key] = step()
                record_file.write_text(json.dumps(record, indent=1))
            print(f"{key}: {record[key]}", file=sys.stderr, flush=True)
    text = report(record, args)
    publish(text, BEGIN, END, write=not args.no_write)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["0.6b", "1.7b"], choices=["0.6b", "1.7b"])
    p.add_argument("--cache", type=Path, help="default: the benchmarks' cache (qasr.bench.harness), export/")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=24, help="decode steps timed for the per-token median")
    p.add_argument("--rounds", type=int, default=3, help="turns of every bundle's worker and the peer")
    p.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md as it is")
    p.add_argument("--report", action="store_true", help="write the section from the steps already recorded")
    p.add_argument("--worker", nargs=2, metavar=("BUNDLE", "AUDIO"), help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def steps(model: str, cache: Path, audio: Path, peer: Path, args):
    """(record key, step) in order: checkpoint, exports, the rounds of runs and the peer, one-shot peaks."""
    checkpoint, bundle = cache / f"ckpt-{model}", lambda name: cache / f"{model}-{name}"
    yield f"{model} checkpoint", lambda: _checkpoint(checkpoint, model)
    yield f"{model} export fp32", lambda: timed(["export", str(checkpoint), "--out", str(bundle("fp32"))], bundle("fp32"))
    yield f"{model} export int4", lambda: timed(["export", str(checkpoint), "--out", str(bundle("int4")), "--weights",
                                                 "int4", "--encoder-weights", "int8"], bundle("int4"))
    yield f"{model} export int8", lambda: timed(["export", str(bundle("fp32")), "--out", str(bundle("int8")),
                                                 "--weights", "int8"], bundle("int8"))
    yield f"{model} export int4-fused", lambda: timed(["export", str(checkpoint), "--out", str(bundle("int4-fused")),
                                                       "--weights", "int4", "--encoder-weights", "int8", "--decoder",
                                                       "fused"], bundle("int4-fused"))
    yield f"{model} runs", lambda: rounds(model, checkpoint, bundle, audio, peer, args)
    for name in RUNS:
        yield f"{model} transcribe {name}", lambda name=name: one_shot(bundle(name), audio, model, name, args)


def rounds(model: str, checkpoint: Path, bundle, audio: Path, peer: Path, args) -> dict[str, list[dict]]:
    """Every bundle's worker, then the peer, `args.rounds` times over: system -> the rounds' rows."""
    from bench_quant import peer_run

    rows: dict[str, list[dict]] = {name: [] for name in [*RUNS, PEER]}
    for turn in range(args.rounds):
        for name in RUNS:
            rows[name].append(run(bundle(name), audio, model, name, args))
            print(f"  round {turn + 1}, {name}: {rows[name][-1].get('decode_ms', '-')}", file=sys.stderr, flush=True)
        rows[PEER].append(peer_run(peer, checkpoint, audio, args))
    return rows


def one_shot(bundle: Path, audio: Path, model: str, name: str, args) -> dict:
    """`qasr transcribe` of the recording under GNU time, or a note that the machine lacks the memory."""
    note = lacks_memory(model, name)
    return {"skipped": note} if note else timed(["transcribe", str(audio), "--model", str(bundle), "--threads",
                                                 str(args.threads)], None)


def lacks_memory(model: str, name: str) -> str | None:
    """Why the machine cannot run this bundle now (only an fp32 one can be too big), or None."""
    from qasr.memory import available_memory

    if name == "fp32" and available_memory() < RUN_MEMORY[model]:
        return (f"needs about {RUN_MEMORY[model] / 1e9:.0f} GB free; "
                f"{available_memory() / 1e9:.1f} GB were available")
    return None


def _checkpoint(path: Path, model: str) -> dict:
    from qasr.models.synthetic import make_checkpoint

    if not (path / "config.json").is_file():
        make_checkpoint(path, model)
    return {"bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def timed(argv: list[str], out: Path | None) -> dict:
    """`qasr ARGV` under GNU time: wall seconds, peak resident memory, and the size of the bundle it wrote."""
    from qasr.memory import kb_gb

    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "qasr", *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"qasr {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    row = {"seconds": seconds, "peak_gb": kb_gb(peak_kb)}
    return row | ({"bundle_gb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9} if out else {})


def run(bundle: Path, audio: Path, model: str, name: str, args) -> dict:
    """A fresh process of this script's worker, or a note that the machine lacks the memory."""
    note = lacks_memory(model, name)
    if note:
        return {"skipped": note}
    from qasr.bench.workers import json_from_child

    command = [sys.executable, __file__, "--worker", str(bundle), str(audio), "--threads", str(args.threads),
               "--steps", str(args.steps), "--spawned", repr(time.time())]
    return json_from_child(command, f"the worker on {bundle}")


def worker(bundle: Path, audio: Path, args) -> dict:
    """Load, transcribe twice (one token each: the first call's setup and prefill against the
    second's), then a forced decode of steps + 1 tokens for the per-token median."""
    from qasr.runtime.audio import load_audio
    from qasr.runtime.batch import greedy_decode
    from qasr.runtime.embed import embed_audio
    from qasr.runtime.prompt import prompt_ids
    from qasr.runtime.backends.onnxruntime_cpu import share_threads
    from qasr.runtime.transcribe import Transcriber

    share_threads(args.threads)  # as a qasr command's process does
    model = Transcriber.load(bundle, backend="onnxruntime", threads=args.threads)
    calls = []
    for _ in range(2):
        timings = model.transcribe(str(audio), max_new_tokens=1).timings
        calls.append({key: timings[key] for key in ("encoder", "setup", "prefill")} | {"ended": time.time()})
    wave = load_audio(str(audio))
    embeds = embed_audio(model.backend, wave, model.window_frames)
    stamps: list[float] = []
    greedy_decode(model.backend, prompt_ids(model.tokenizer, "", None, len(embeds)), embeds, model.audio_token,
                  args.steps + 1, eos_ids=(), on_token=lambda _: stamps.append(time.perf_counter()))
    return {"cold_start": calls[0]["ended"] - args.spawned, "first": calls[0], "second": calls[1],
            "decode_ms": 1000 * float(np.median(np.diff(stamps)))}


def report(record: dict, args) -> str:
    from qasr.bench.harness import describe_machine

    lines = [
        "## The 1.7B on a small machine: bounded export, quantization, run time",
        "",
        f"{datetime.date.today()}, `python scripts/bench_export.py --models {' '.join(args.models)} --rounds "
        f"{args.rounds}` ({args.threads} threads). {record.get('machine') or describe_machine()}: a load average at "
        "start of 2 "
        "or less means the machine was this benchmark's alone, more that other jobs shared it (compare within a "
        "table). Full-size random checkpoints "
        "(bf16, the released shapes); random weights give flat logits: speed and memory, not accuracy.",
        "",
        "| model | step | time | peak memory | result |",
        "|---|---|---|---|---|",
    ]
    for model in args.models:
        ck = record.get(f"{model} checkpoint", {})
        for name, step in (("fp32", "`qasr export CKPT --out B`"),
                           ("int4", "`qasr export CKPT --out Q --weights int4 --encoder-weights int8` (no fp32 bundle)"),
                           ("int8", "`qasr export B --out Q8 --weights int8` (from the fp32 bundle)"),
                           ("int4-fused", "the int4 export with `--decoder fused`")):
            row = record.get(f"{model} export {name}")
            if row:
                lines.append(f"| {model} | {step} | {row['seconds'] / 60:.1f} min | {row['peak_gb']:.2f} GB | "
                             f"bundle {row['bundle_gb']:.2f} GB (checkpoint {ck.get('bytes', 0) / 1e9:.2f} GB) |")
    lines += ["", f"A 10 s recording, ONNX Runtime, each bundle in a fresh process, taking turns with the peer "
              f"for {args.rounds} rounds (medians; decode's range in brackets). \"First call\" is the first "
              "`transcribe` after loading, whose setup includes waiting for the decoder still loading in the "
              "background (the second call shows the steady state). Peak memory: `qasr transcribe AUDIO --model "
              "BUNDLE` under GNU time (a one-shot command: it encodes the recording, frees the audio encoder and "
              "only then loads the decoder), the peer's own run from wait4, in GB of 10^9 bytes (both count "
              "in KiB).", "",
              "| model | system | cold start | first call: setup, prefill | second call: setup, prefill | "
              "encoder | decode ms/token | x antirez | peak memory |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        runs = record.get(f"{model} runs", {})
        peer = median_row(runs[PEER]) if runs.get(PEER) else None
        for name in RUNS:
            if not runs.get(name):
                continue
            row, shot = median_row(runs[name]), record.get(f"{model} transcribe {name}", {})
            if "skipped" in row:
                lines.append(f"| {model} | {name} | not run: {row['skipped']} | | | | | | |")
                continue
            first, second = row["first"], row["second"]
            ratio = f"{row['decode_ms'] / peer['decode_ms']:.2f}" if peer else ""
            peak = f"{shot['peak_gb']:.2f} GB" if "peak_gb" in shot else "not run"
            lines.append(f"| {model} | {LABELS.get(name, name)} | {row['cold_start']:.1f} s | {first['setup']:.2f} s, "
                         f"{first['prefill']:.2f} s | {second['setup']:.2f} s, {second['prefill']:.2f} s | "
                         f"{second['encoder']:.2f} s | {row['decode_ms']:.0f} ({spread(runs[name])}) | {ratio} | "
                         f"{peak} |")
        if peer:
            lines.append(f"| {model} | {PEER} (bf16) | {peer['cold_start']:.1f} s | prefill+encoder "
                         f"{peer['ttft']:.2f} s | | {peer['encoder']:.2f} s | {peer['decode_ms']:.0f} "
                         f"({spread(runs[PEER])}) | 1.00 | {peer['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)


def median_row(rows: list[dict]) -> dict:
    """The rounds' median of every figure (nested ones too); a skipped run stays a note."""
    if "skipped" in rows[0]:
        return rows[0]
    return {key: median_row([row[key] for row in rows]) if isinstance(value, dict)
            else float(np.median([row[key] for row in rows])) for key, value in rows[0].items()}


def spread(rows: list[dict]) -> str:
    """The decode ms/token range over the rounds."""
    values = [row["decode_ms"] for row in rows if "decode_ms" in row]
    return f"{min(values):.0f}-{max(values):.0f}" if values else "-"


if __name__ == "__main__":
    sys.exit(main())
