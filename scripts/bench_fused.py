"""The fused decoder against the traced one and antirez/qwen-asr: decode ms/token on the CPU.

    python scripts/bench_fused.py --checkpoint CKPT --work DIR [--peer-source QWEN_ASR_CHECKOUT]

CKPT is a full-size random 0.6B (scripts/make_checkpoint.py --preset 0.6b); DIR receives its four
bundles (traced and fused decoder, fp32 and int4), exported once. Each figure is the median decode
step of a fresh process (qasr.bench.workers, forced to --steps + 1 tokens), on 10 s and 60 s of
speech, beside antirez/qwen-asr (pure C, bf16, `make blas`) on the same checkpoint and audio in the
same run, rounds interleaved so that other jobs on a shared machine slow every system alike. Also
the nodes ONNX Runtime runs in one decode step, per layer, from its profiler. Writes a section of
docs/benchmarks.md.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_quant import PEER_SOURCE, build_peer, peer_run, qasr_run  # noqa: E402

from qasr.bench.docs import publish  # noqa: E402
from qasr.bench.harness import describe_machine, speech_file  # noqa: E402

BEGIN, END = "<!-- fused:begin -->", "<!-- fused:end -->"
SYSTEMS = {"traced fp32": ("traced", "fp32"), "fused fp32": ("fused", "fp32"),
           "traced int4": ("traced", "int4"), "fused int4": ("fused", "int4")}


def main() -> int:
    args = parser().parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bundles = {name: bundle(args.checkpoint, args.work, *spec) for name, spec in SYSTEMS.items()}
    if args.interleaved_only:
        print(pair_report({w: interleaved(bundles[f"traced {w}"], bundles[f"fused {w}"], args) for w in ("fp32", "int4")},
                          args))
        return 0
    nodes = {name: step_nodes(path) for name, path in bundles.items()}
    peer = build_peer(args.work, args.peer_source)
    rows = []
    for seconds in (10, 60):
        audio = speech_file(args.work, seconds)
        for _ in range(args.repeats):
            for name, path in bundles.items():
                rows.append({"system": name, "seconds": seconds, **qasr_run(args.checkpoint, path, audio, args)})
                print(rows[-1]["system"], seconds, rows[-1]["decode_ms"], file=sys.stderr, flush=True)
            rows.append({"system": "antirez/qwen-asr", "seconds": seconds,
                         **peer_run(peer, args.checkpoint, audio, args)})
            print("antirez", seconds, rows[-1]["decode_ms"], file=sys.stderr, flush=True)
    pairs = {weights: interleaved(bundles[f"traced {weights}"], bundles[f"fused {weights}"], args)
             for weights in ("fp32", "int4")}
    (args.work / "runs.json").write_text(json.dumps({"rows": rows, "nodes": nodes, "pairs": pairs}, indent=1))
    text = report(rows, nodes, args) + "\n\n" + pair_report(pairs, args)
    publish(text, BEGIN, END, write=not args.no_write)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a full-size 0.6B checkpoint directory")
    p.add_argument("--work", type=Path, required=True, help="where the bundles and the peer's build go")
    p.add_argument("--peer-source", type=Path, default=PEER_SOURCE, help="a checkout of antirez/qwen-asr")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed for the per-token median")
    p.add_argument("--repeats", type=int, default=2, help="rounds of fresh processes per clip length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--interleaved-only", action="store_true",
                   help="only the one-process comparison of the two decoders (rewrites nothing of the table)")
    return p


def bundle(checkpoint: Path, work: Path, decoder: str, weights: str) -> Path:
    """The bundle, exported once; int4 is quantized from the fp32 one of the same decoder."""
    from qasr.export.onnx_export import export_bundle
    from qasr.export.quantize import quantize_bundle

    out = work / f"{decoder}-{weights}"
    if not (out / "manifest.json").is_file():
        if weights == "fp32":
            export_bundle(checkpoint, out, progress=lambda line: print(line, file=sys.stderr), decoder=decoder)
        else:
            quantize_bundle(bundle(checkpoint, work, decoder, "fp32"), out, weights,
                            progress=lambda line: print(line, file=sys.stderr))
    return out


def step_nodes(path: Path, filled: int = 200) -> float:
    """Nodes ONNX Runtime's profiler sees run in one decode step (batch 1, `filled` cached rows),
    per decoder layer."""
    import onnxruntime as ort

    from qasr.runtime.bundle import Bundle

    bundle = Bundle.load(path)
    text, graph = bundle.model["text"], bundle.manifest["graphs"]["decoder"]
    feeds = {}
    for name, spec in graph["inputs"].items():
        shape = [1 if d in ("batch", "new", "audio") else filled + 1 if d == "capacity" else d for d in spec["shape"]]
        feeds[name] = np.zeros(shape, dtype=spec["dtype"])
    if graph.get("layout") == "slots":
        feeds.update(seqlens_k=np.array([filled], np.int32), total_sequence_length=np.array(filled + 1, np.int32))
    else:
        feeds["position"] = np.array([filled])
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.enable_profiling, options.profile_file_prefix = True, os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(bundle.graph_path("decoder")), options, providers=["CPUExecutionProvider"])
        for _ in range(2):
            session.run(["next_token"], feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return len(nodes) / 2 / text["num_hidden_layers"]


def interleaved(traced: Path, fused: Path, args) -> dict[int, dict[str, float]]:
    """Decode steps of the traced and the fused decoder alternated one for one in one process, at
    the cache lengths of a 10 s and a 60 s clip (prompt rows 150 and 800): a busy machine then
    slows both alike. Median ms per step of each."""
    from qasr.runtime.backends.select import open_backend
    from qasr.runtime.bundle import Bundle

    backends = {name: open_backend(Bundle.load(path), "onnxruntime", args.threads)
                for name, path in (("traced", traced), ("fused", fused))}
    hidden = Bundle.load(fused).model["text"]["hidden_size"]
    figures = {}
    for seconds, filled in ((10, 150), (60, 800)):
        times: dict[str, list[float]] = {name: [] for name in backends}
        for backend in backends.values():
            backend.reserve((1, filled + 128) if getattr(backend, "slots", False) else filled + 128, keep=False)
            backend.prefill(np.full((1, filled), 7, dtype=np.int64), np.zeros((1, 1, hidden), np.float32), 0, 0)
        for step in range(args.steps * 2):
            for name, backend in backends.items():
                began = time.perf_counter()
                backend.step(np.array([7]), np.array([0]), np.array([filled + step]))
                times[name].append(1000 * (time.perf_counter() - began))
        figures[seconds] = {name: statistics.median(values[2:]) for name, values in times.items()}
        print("interleaved", seconds, figures[seconds], file=sys.stderr, flush=True)
    return figures


def pair_report(pairs: dict, args) -> str:
    lines = [f"Interleaved in one process ({2 * args.steps} steps each, alternating, batch 1, cache rows of a "
             "10 s / 60 s prompt): median ms per decode step.", "",
             "| weights | traced, 10 s | fused, 10 s | fused / traced | traced, 60 s | fused, 60 s | fused / traced |",
             "|---|---|---|---|---|---|---|"]
    for weights, figures in pairs.items():
        cells = []
        for seconds in (10, 60):
            traced, fused = figures[seconds]["traced"], figures[seconds]["fused"]
            cells += [f"{traced:.1f}", f"{fused:.1f}", f"{fused / traced:.2f}"]
        lines.append(f"| {weights} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict], nodes: dict, args) -> str:
    def median(system, seconds):
        return statistics.median(r["decode_ms"] for r in rows if r["system"] == system and r["seconds"] == seconds)

    load = os.getloadavg()
    lines = [f"## Fused decoder on the CPU\n\n{datetime.date.today()}, `python scripts/bench_fused.py --checkpoint "
             f"CKPT --work DIR --steps {args.steps} --repeats {args.repeats}` ({args.threads} threads), full-size "
             f"random 0.6B (its logits are flat, so this measures speed only).\n\n{describe_machine()}; load average at the "
             f"end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min; 2 is this benchmark alone): every "
             "figure is a median of interleaved rounds, and the ratios are to peers measured beside it, so that "
             "other jobs on a shared machine slow every system alike.",
             "", "| system | nodes per layer per step | decode ms/token, 10 s | x antirez | decode ms/token, 60 s "
             "| x antirez | x traced, 10 s / 60 s |", "|---|---|---|---|---|---|---|"]
    for system in [*SYSTEMS, "antirez/qwen-asr"]:
        ten, sixty = median(system, 10), median(system, 60)
        peer10, peer60 = median("antirez/qwen-asr", 10), median("antirez/qwen-asr", 60)
        traced = system.replace("fused", "traced")
        vs_traced = (f"{ten / median(traced, 10):.2f} / {sixty / median(traced, 60):.2f}"
                     if system.startswith("fused") else "")
        count = f"{nodes[system]:.1f}" if system in nodes else ""
        lines.append(f"| {system} | {count} | {ten:.1f} | {ten / peer10:.2f} | {sixty:.1f} | {sixty / peer60:.2f} "
                     f"| {vs_traced} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
