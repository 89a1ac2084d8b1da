"""`qasr bench`: against the official transformers backend, and the physical floor.

    qasr bench [--models 0.6b 1.7b] [--seconds 10 60 300] [--repeats 3]

The official qwen-asr transformers backend (fp32 and bf16) and this project's ONNX Runtime
backend, on the same random full-size checkpoint and the same speech, in one run, each
measurement in a fresh process (qasr.bench.workers). Generation is forced to the same number of
tokens on both sides (3 per second of audio, end-of-sequence ignored), since random weights
decide nothing. Needs the test extras (the official package, torch) for the peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qasr.bench.docs import DOC, write_section
from qasr.bench.harness import DEFAULT_CACHE, bytes_per_token, describe_machine, measure_bandwidth, prepare, speech_file
from qasr.bench.workers import SYSTEMS

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TOKENS_PER_SECOND = 3  # forced generation length: a moderate speech rate
# Peak DRAM bandwidth of the devices the bf16 engines target (GB/s, from NVIDIA's data sheets).
DEVICES = {"Jetson Orin Nano 8 GB": 68, "Jetson AGX Orin": 204.8, "RTX 4090": 1008, "H100 SXM": 3350}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    return parser


def worker(system, checkpoint, bundle, audio, seconds, args) -> dict:
    """One measurement in a fresh process; its JSON line back."""
    command = [sys.executable, "-m", "qasr.bench.workers", system, "--checkpoint", str(checkpoint),
               "--bundle", str(bundle), "--audio", str(audio), "--threads", str(args.threads),
               "--steps", str(args.steps), "--tokens", str(max(args.steps + 1, int(TOKENS_PER_SECOND * seconds))),
               "--spawned", repr(time.time())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{system} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], bandwidth: float, args) -> str:
    lines = [
        "## Against the official transformers backend",
        "",
        f"{datetime.date.today()}, `qasr bench --models {' '.join(args.models)} --seconds "
        f"{' '.join(f'{s:g}' for s in args.seconds)} --repeats {args.repeats}"
        + (f" --skip {' '.join(args.skip)}" if args.skip else "") + f"` ({args.threads} threads)",
        "",
        describe_machine(),
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
