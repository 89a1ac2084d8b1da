"""`qasr serve --ray`: throughput and latency with 1 and 2 replicas, and what the Ray ingress adds.

    python scripts/bench_ray.py [BUNDLE] [--preset tiny] [--concurrency 1 2 4 8] [--runs 20]

Starts its own Ray head on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, nothing beyond
loopback) and ends it afterwards. Without BUNDLE it exports a random checkpoint of `--preset`
(tiny: seconds; 0.6b: the released shape, gigabytes per replica).

1. Concurrency: scripts/bench_serve.py's 8 recordings of 10 s, 64 tokens each, sent by 1, 2, 4
   and 8 clients at once through the official openai SDK, against `qasr serve --ray ... --replicas 1`
   and `--replicas 2` (one thread each, --max-batch 8): audio seconds per wall second, p50 and p95
   latency; every answer equals the in-process text.
2. Ingress overhead at concurrency 1: one clip `--runs` times through plain `qasr serve` (the
   peer) and through `qasr serve --ray --replicas 1`, both one thread, both up at once and the
   requests alternating between them (so load from other jobs falls on both alike): latency, and
   the part of it outside the server's own pipeline (verbose_json's timings), which is what the
   ingress adds.

Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_serve import CLIP_TOKENS, Server, clip_files, concurrency, free_port  # noqa: E402

from qasr.bench.docs import write_section  # noqa: E402
from qasr.bench.harness import describe_machine  # noqa: E402

BEGIN, END = "<!-- ray:begin -->", "<!-- ray:end -->"
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


@contextmanager
def ray_head(cpus: int):
    """A Ray head on 127.0.0.1 in a session of its own; its address. SIGTERM ends it (and its children)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="qasr-ray-", dir="/tmp") as temp:
        head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                                 str(port), "--include-dashboard=false", "--disable-usage-stats", "--num-cpus",
                                 str(cpus), "--temp-dir", temp, "--ray-client-server-port", str(free_port()),
                                 "--dashboard-agent-listen-port", str(free_port())],
                                env={**os.environ, **LOOPBACK}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        for line in head.stdout:  # type: ignore[union-attr]
            if "Ray runtime started" in line:
                break
        else:
            raise SystemExit("ray start --head failed")
        try:
            yield f"127.0.0.1:{port}"
        finally:
            head.terminate()
            head.wait(120)


def export(preset: str, folder: Path) -> str:
    from qasr.export.onnx_export import export_bundle
    from qasr.models.synthetic import make_checkpoint

    return str(export_bundle(make_checkpoint(folder / "checkpoint", preset, 0), folder / "bundle",
                             progress=lambda line: None))


def overhead(bundle: str, clip: Path, runs: int, address: str) -> dict:
    """Per request, one at a time, through plain `qasr serve` and through `--ray --replicas 1`: the
    client's seconds and the part outside the server's own pipeline (client seconds less the
    `total` of verbose_json's timings: HTTP, multipart, Serve's proxy, hand-offs). Both servers are
    up together and the requests alternate, so load from elsewhere falls on both alike."""
    times: dict = {name: {"latency": [], "outside": []} for name in ("plain", "ray")}
    with Server(bundle, CLIP_TOKENS, max_queue=16, threads=1) as plain, \
            Server(bundle, CLIP_TOKENS, max_queue=16, threads=1, extra=("--ray", address, "--replicas", "1")) as ray:
        text = plain.transcribe(clip)[0]
        assert ray.transcribe(clip)[0] == text  # warm-up, and the same text
        for _ in range(runs):
            for name, server in (("plain", plain), ("ray", ray)):
                begin = time.perf_counter()
                with open(clip, "rb") as f:
                    got = server.client.audio.transcriptions.create(model="qasr", file=f,
                                                                    response_format="verbose_json")
                seconds = time.perf_counter() - begin
                assert got.text == text
                times[name]["latency"].append(seconds)
                times[name]["outside"].append(seconds - got.model_extra["qasr"]["timings"]["total"])
    return times


def section(rows: list[dict], times: dict, args, bundle_name: str, where: str, load_end: str) -> str:
    by = {(r["replicas"], r["clients"]): r for r in rows}
    lines = [
        "## `qasr serve --ray`: replicas and the Ray ingress",
        "",
        f"`python scripts/bench_ray.py {args.bundle or '--preset ' + args.preset} --concurrency "
        f"{' '.join(map(str, args.concurrency))} --runs {args.runs}` on {time.strftime('%Y-%m-%d')}: one Ray node on "
        f"127.0.0.1 started by the script; {bundle_name}, fp32, ONNX Runtime, one thread per replica, "
        f"`--max-batch 8`. 8 different recordings of 10 s, {CLIP_TOKENS} tokens each, every one sent once per "
        "row by that many clients at once through the official openai SDK over loopback; every answer equals "
        f"the in-process text. {where}; load average at the end {load_end}.",
        "",
        "| clients | 1 replica: audio s per s | p50 s | p95 s | 2 replicas: audio s per s | p50 s | p95 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in args.concurrency:
        cells = []
        for replicas in (1, 2):
            r = by[(replicas, clients)]
            cells.append(f"{r['audio_per_s']:.2f} | {r['p50']:.3f} | {r['p95']:.3f}")
        lines.append(f"| {clients} | {' | '.join(cells)} |")
    if not args.bundle and args.preset.startswith("tiny"):
        lines += ["", "The model is a tiny random one: these figures are the serving path's (HTTP, Serve's proxy, "
                  "the queue, process hand-offs) more than decoding's, and say nothing of accuracy (random "
                  "weights give flat logits). A full-size 0.6B server peaks at about 4.3 GB resident (the server "
                  "concurrency table above): two such replicas would pass the 6 GB one job may take on this "
                  "shared machine."]
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        lines += ["", f"The machine was shared with other jobs during the run (load averages above, on "
                  f"{os.cpu_count()} cores): replicas and clients competed with them for the cores, so these "
                  "figures are rough, and a second replica had no core of its own to add."]
    median = {name: {k: statistics.median(v) for k, v in series.items()} for name, series in times.items()}
    lines += [
        "",
        f"Ingress overhead at concurrency 1: {args.runs} requests of one clip to each server, alternating between "
        "them, both up at once; medians. *Outside* is the client's seconds less the server's own pipeline time "
        "(verbose_json's `total`): HTTP, multipart, Serve's proxy and the hand-offs.",
        "",
        "| path | latency s | outside the pipeline, ms |",
        "|---|---|---|",
        f"| plain `qasr serve` (the peer) | {median['plain']['latency']:.3f} | {median['plain']['outside'] * 1000:.1f} |",
        f"| `qasr serve --ray --replicas 1` | {median['ray']['latency']:.3f} | {median['ray']['outside'] * 1000:.1f} "
        f"({(median['ray']['outside'] - median['plain']['outside']) * 1000:+.1f}) |",
    ]
    if median["ray"]["latency"] < median["plain"]["latency"]:
        lines += ["", "The pipeline itself ran faster in the Ray replica than in the plain server in this run (same "
                  "bundle, threads and options; the cause was not found), so the latency column does not give "
                  "the ingress's cost: the outside column does."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="an fp32 bundle (default: export a random --preset)")
    parser.add_argument("--preset", default="tiny", help="random checkpoint shape when no bundle is given")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    args = parser.parse_args(argv)
    os.environ.update(LOOPBACK)
    where = describe_machine()
    with tempfile.TemporaryDirectory() as folder:
        bundle = args.bundle or export(args.preset, Path(folder))
        name = Path(args.bundle).name if args.bundle else f"random `{args.preset}` checkpoint (make_checkpoint preset)"
        clips = clip_files(Path(folder))
        from qasr.runtime.transcribe import Transcriber

        model = Transcriber.load(bundle, backend="onnxruntime", threads=1)
        texts = [model.transcribe(str(clip), max_new_tokens=CLIP_TOKENS).text for clip in clips]
        del model
        with ray_head(cpus=2) as address:
            rows = []
            for replicas in (1, 2):
                extra = ("--ray", address, "--replicas", str(replicas))
                for row in concurrency(bundle, clips, texts, args.concurrency, 8, threads=1, extra=extra):
                    rows.append({**row, "replicas": replicas})
            times = overhead(bundle, clips[0], args.runs, address)
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = section(rows, times, args, name, where, load_end)
    write_section(args.doc, BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
