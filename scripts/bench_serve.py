"""What `qasr serve` adds to a request: the server against the same pipeline called in-process.

    python scripts/bench_serve.py [BUNDLE] [--runs 5] [--clients 4]

The peer is `Transcriber.transcribe` in this process, which is what `qasr transcribe` runs; the
server gets the same file through the official `openai` SDK over loopback, one request at a time
(the overhead: upload, multipart, queue, thread hand-off, JSON), then `--clients` at once (the
queue serialises them on the one worker, so throughput should match sequential and latency grow
with the queue). The same token budget for both, since a random-weight model rarely stops by
itself. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qasr.bench import machine, write_section  # noqa: E402

BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"
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


def through_server(bundle: str, audio: Path, runs: int, tokens: int, clients: int, text: str) -> dict:
    import httpx2
    import openai

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "qasr", "serve", "--model", bundle, "--backend", "onnxruntime",
                             "--port", str(port), "--max-new-tokens", str(tokens), "--max-queue", str(4 * clients)],
                            env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            try:
                if httpx2.get(f"{url}/health").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if proc.poll() is not None:
                raise SystemExit("the server exited while loading")
            time.sleep(0.2)
        ready = time.perf_counter() - started
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

        def one(_=None) -> float:
            begin = time.perf_counter()
            with open(audio, "rb") as f:
                assert client.audio.transcriptions.create(model="qasr", file=f).text == text
            return time.perf_counter() - begin

        one()
        sequential = [one() for _ in range(runs)]
        begin = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            concurrent = list(pool.map(one, range(clients * runs)))
        wall = time.perf_counter() - begin
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1e6
        return {"ready": ready, "sequential": sequential, "concurrent": concurrent, "wall": wall, "peak_gb": peak}
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--audio", type=Path, default=ROOT / "tests/data/en_16k_s16.wav")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    args = parser.parse_args(argv)
    where = machine()
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
        f"on {time.strftime('%Y-%m-%d')}: {args.audio.name}, {args.max_new_tokens} tokens per request (a "
        "random-weight full-size checkpoint: the speed is the real model's, the text is noise). "
        f"{where}. The machine was shared with other jobs while this ran.",
        "",
        *rows,
        "",
        f"The server was ready (`/health` 200, every graph loaded) {served['ready']:.1f} s after start; its peak "
        f"resident memory was {served['peak_gb']:.2f} GB. Concurrent requests queue for the one inference "
        "worker, so their latency includes the wait and their throughput is the sequential one.",
    ])
    write_section(args.doc, BEGIN, END, text_out)
    print(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
