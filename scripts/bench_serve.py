"""What `qasr serve` adds to a request, and what continuous batching gives its clients.

    python scripts/bench_serve.py [BUNDLE] [--runs 5] [--clients 4] [--concurrency 1 2 4 8]

1. Overhead: the peer is `Transcriber.transcribe` in this process, which is what `qasr transcribe`
   runs; the server gets the same file through the official `openai` SDK over loopback, one
   request at a time (the overhead: upload, multipart, queue, thread hand-off, JSON), then
   `--clients` at once. The same token budget for both, since a random-weight model rarely stops.
2. Concurrency, as the paper's table: 8 different 10 s recordings (scripts/bench_batch.py's),
   64 tokens each, sent by 1, 2, 4 and 8 clients at once (each client sends its share back to
   back), against a server at `--max-batch 8` and one at `--max-batch 1` (every request decodes
   alone: the server before continuous batching). Audio seconds transcribed per wall second, and
   the mean and p95 latency of a request; every answer is checked against the in-process text.

Writes its sections of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qasr.bench.docs import write_section  # noqa: E402
from qasr.bench.harness import describe_machine  # noqa: E402
from qasr.memory import kb_gb, status_kb  # noqa: E402

BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"
CONCURRENCY_BEGIN, CONCURRENCY_END = "<!-- serve-concurrency:begin -->", "<!-- serve-concurrency:end -->"
CLIP_TOKENS = 64
DEFAULT_BUNDLE = Path.home() / ".cache/qasr-bench/qwen3-asr-0.6b-bundle"


def in_process(bundle: str, audio: Path, runs: int, tokens: int) -> tuple[list[float], str]:
    from qasr.runtime.transcribe import Transcriber

    model = Transcriber.load(bundle, backend="onnxruntime")
    text = model.transcribe(str(audio), max_new_tokens=tokens).text  # the first call loads the decoder
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        assert model.transcribe(str(audio), max_new_tokens=tokens).text == text
        times.append(time.perf_counter() - start)
    return times, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qasr serve` in a subprocess on a free loopback port, ready (every graph loaded) on entry."""

    def __init__(self, bundle: str, tokens: int, max_queue: int, max_batch: int = 8, threads: int = 2,
                 extra: tuple = ()):
        port = free_port()
        self.argv = [sys.executable, "-m", "qasr", "serve", "--model", bundle, "--backend", "onnxruntime",
                     "--port", str(port), "--threads", str(threads), "--max-new-tokens", str(tokens),
                     "--max-queue", str(max_queue), "--max-batch", str(max_batch), *extra]
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        import httpx2
        import openai

        self.proc = subprocess.Popen(self.argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        while True:
            try:
                if httpx2.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit("the server exited while loading")
            time.sleep(0.2)
        self.ready = time.perf_counter() - started
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=900)
        return self

    def transcribe(self, audio: Path) -> tuple[str, float]:
        """(text, seconds) of one request through the openai SDK (one client for all, thread-safe)."""
        begin = time.perf_counter()
        with open(audio, "rb") as f:
            text = self.client.audio.transcriptions.create(model="qasr", file=f).text
        return text, time.perf_counter() - begin

    def peak_gb(self) -> float:
        return kb_gb(status_kb("VmHWM", self.proc.pid))

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def through_server(bundle: str, audio: Path, runs: int, tokens: int, clients: int, text: str) -> dict:
    with Server(bundle, tokens, max_queue=4 * clients) as server:
        def one(_=None) -> float:
            got, seconds = server.transcribe(audio)
            assert got == text
            return seconds

        one()
        sequential = [one() for _ in range(runs)]
        begin = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            concurrent = list(pool.map(one, range(clients * runs)))
        wall = time.perf_counter() - begin
        return {"ready": server.ready, "sequential": sequential, "concurrent": concurrent, "wall": wall,
                "peak_gb": server.peak_gb()}


def clip_files(folder: Path) -> list[Path]:
    """scripts/bench_batch.py's 8 recordings of 10 s, as wav files."""
    import soundfile as sf
    from bench_batch import recordings

    paths = []
    for i, clip in enumerate(recordings()):
        paths.append(folder / f"clip{i}.wav")
        sf.write(paths[-1], clip, 16000, subtype="PCM_16")
    return paths


def concurrency(bundle: str, clips: list[Path], texts: list[str], levels: list[int], max_batch: int,
                threads: int = 2, extra: tuple = ()) -> list[dict]:
    """Per level: every clip sent once, by that many clients at once, each sending its share in turn
    (`extra`: more `qasr serve` options, such as --ray)."""
    import soundfile as sf

    audio_seconds = sum(sf.info(clip).duration for clip in clips)
    rows = []
    with Server(bundle, CLIP_TOKENS, max_queue=16, max_batch=max_batch, threads=threads, extra=extra) as server:
        server.transcribe(clips[0])  # warm-up
        for clients in levels:
            def client(share: list[int]) -> list[float]:
                latencies = []
                for i in share:
                    text, seconds = server.transcribe(clips[i])
                    assert text == texts[i], f"clip {i}: the server's text differs from the in-process one"
                    latencies.append(seconds)
                return latencies

            shares = [list(range(c, len(clips), clients)) for c in range(clients)]
            begin = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = [s for part in pool.map(client, shares) for s in part]
            wall = time.perf_counter() - begin
            rows.append({"clients": clients, "max_batch": max_batch, "audio_per_s": audio_seconds / wall,
                         "mean": statistics.mean(latencies), "p50": statistics.median(latencies),
                         "p95": float(np.percentile(latencies, 95)),
                         "wall": wall, "peak_gb": server.peak_gb()})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def concurrency_section(rows: list[dict], bundle: str, levels: list[int], where: str) -> str:
    alone = {r["clients"]: r for r in rows if r["max_batch"] == 1}
    lines = [
        "## Server concurrency (continuous batching)",
        "",
        f"`python scripts/bench_serve.py {Path(bundle).name} --concurrency {' '.join(map(str, levels))}` on "
        f"{time.strftime('%Y-%m-%d')}: 8 different recordings of 10 s, {CLIP_TOKENS} tokens each, every one "
        "sent once per row by that many clients at once (each sends its share back to back), through the "
        "official openai SDK over loopback; every answer equals the in-process text. Full-size random "
        f"0.6B, fp32, ONNX Runtime, 2 threads. {where}.",
        "",
        "| clients | `--max-batch 8`: audio s per s | mean latency s | p95 latency s | `--max-batch 1`: audio s per s "
        "| mean latency s | p95 latency s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["max_batch"] != 1):
        a = alone.get(r["clients"])
        tail = f"{a['audio_per_s']:.2f} | {a['mean']:.1f} | {a['p95']:.1f}" if a else "- | - | -"
        lines.append(f"| {r['clients']} | {r['audio_per_s']:.2f} | {r['mean']:.1f} | {r['p95']:.1f} | {tail} |")
    peak = max(r["peak_gb"] for r in rows if r["max_batch"] != 1)
    lines += ["", f"Peak resident memory of the `--max-batch 8` server: {peak:.2f} GB. Random weights give flat "
              "logits: these are speed figures, not accuracy."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--audio", type=Path, default=ROOT / "tests/data/en_16k_s16.wav")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="client counts of the concurrency table (none: skip it)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    args = parser.parse_args(argv)
    where = describe_machine()
    if args.concurrency:
        from qasr.runtime.transcribe import Transcriber

        with tempfile.TemporaryDirectory() as folder:
            clips = clip_files(Path(folder))
            model = Transcriber.load(args.bundle, backend="onnxruntime", threads=2)
            texts = [model.transcribe(str(clip), max_new_tokens=CLIP_TOKENS).text for clip in clips]
            del model
            rows = [row for max_batch in (8, 1) for row in
                    concurrency(args.bundle, clips, texts, args.concurrency, max_batch)]
        section = concurrency_section(rows, args.bundle, args.concurrency, where)
        write_section(args.doc, CONCURRENCY_BEGIN, CONCURRENCY_END, section)
        print(section)
    if not args.runs:
        return 0
    peer, text = in_process(args.bundle, args.audio, args.runs, args.max_new_tokens)
    served = through_server(args.bundle, args.audio, args.runs, args.max_new_tokens, args.clients, text)
    p, s = statistics.median(peer), statistics.median(served["sequential"])
    n = len(served["concurrent"])
    rows = [
        "| path | median s per request | spread | requests/s |",
        "|---|---|---|---|",
        f"| in-process `Transcriber.transcribe` (the peer: what `qasr transcribe` runs) | {p:.3f} | "
        f"{min(peer):.3f}-{max(peer):.3f} | {1 / p:.2f} |",
        f"| `qasr serve`, openai SDK, one at a time | {s:.3f} (x{s / p:.2f}, {(s - p) * 1000:+.0f} ms) | "
        f"{min(served['sequential']):.3f}-{max(served['sequential']):.3f} | {1 / s:.2f} |",
        f"| `qasr serve`, {args.clients} clients at once ({n} requests) | "
        f"{statistics.median(served['concurrent']):.3f} | {min(served['concurrent']):.3f}-"
        f"{max(served['concurrent']):.3f} | {n / served['wall']:.2f} |",
    ]
    text_out = "\n".join([
        "## Server overhead (`qasr serve` against the in-process pipeline)",
        "",
        f"`python scripts/bench_serve.py {Path(args.bundle).name} --runs {args.runs} --clients {args.clients}` "
        f"on {time.strftime('%Y-%m-%d')}: {args.audio.name}, {args.max_new_tokens} tokens per "
        "request (a random-weight full-size checkpoint: the speed is the real model's, the text is noise). "
        f"{where}.",
        "",
        *rows,
        "",
        f"The server was ready (`/health` 200, every graph loaded) {served['ready']:.1f} s after start; its peak "
        f"resident memory was {served['peak_gb']:.2f} GB. The concurrent requests share the decoder's steps "
        "(continuous batching, `--max-batch 8`); the table above has the figures at 1 to 8 clients.",
    ])
    write_section(args.doc, BEGIN, END, text_out)
    print(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
