"""Quantized weights: the settings sweep, speed against fp32 and antirez/qwen-asr, and verify's accuracy.

    python scripts/bench_quant.py [--steps 24] [--repeats 2] [--sections sweep speed accuracy]

On the full-size random Qwen3-ASR-0.6B of `qasr bench` (its cache, ~/.cache/qasr-bench), 2 threads,
10 s and 60 s of real speech. Every measurement is a fresh process; the fp32 bundle and the pure-C
peer antirez/qwen-asr run in the same run on the same checkpoint and audio. The peer has no switch
for the number of tokens in offline decoding (it stops at end-of-sequence or 2048), so a local copy
is patched to read QWEN_MAX_TOKENS, and its timings are read from its --debug lines on stderr.
Writes the "Quantized weights" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qasr.bench.docs import publish  # noqa: E402
from qasr.bench.harness import DEFAULT_CACHE, bytes_per_token, describe_machine, measure_bandwidth, prepare, speech_file  # noqa: E402
from qasr.bench.workers import json_from_child  # noqa: E402
from qasr.memory import kb_gb  # noqa: E402

BEGIN, END = "<!-- quant:begin -->", "<!-- quant:end -->"
PEER_SOURCE = Path(__file__).resolve().parent.parent.parent / "qwen-asr"  # a checkout of antirez/qwen-asr beside this repo
# name -> (decoder weights, encoder weights, prepacked)
SYSTEMS = {"fp32": ("fp32", "fp32", False), "int8": ("int8", "fp32", False), "int4": ("int4", "fp32", False),
           "int4 + int8 encoder": ("int4", "int8", False), "int4 + int8 encoder, prepacked": ("int4", "int8", True)}
SWEEP = [(4, 32, False, 4), (4, 64, False, 4), (4, 128, False, 4), (4, 128, True, 4), (4, 128, False, 0),
         (8, 32, True, 4), (8, 128, True, 4), (8, 128, False, 4)]  # bits, block, symmetric, accuracy_level
SECTIONS = ("sweep", "speed", "accuracy")
RECORDINGS = ("en_16k_s16.wav", "zh_16k_f32_loud.wav", "de_22k.flac")


def main() -> int:
    args = parser().parse_args()
    if args.sweep_worker:
        print(json.dumps(sweep_worker(args)), flush=True)
        return 0
    cache = args.cache
    checkpoint, fp32 = prepare("0.6b", cache)
    work = cache / "quant"
    work.mkdir(exist_ok=True)
    bandwidth = measure_bandwidth(args.threads) if "speed" in args.sections else 0.0
    if "sweep" in args.sections:
        _keep(work, "sweep", sweep(fp32, work, speech_file(cache, 10), args))
    bundles = {name: build(fp32, work, *spec) for name, spec in SYSTEMS.items()} \
        if {"speed", "accuracy"} & set(args.sections) else {}
    if "speed" in args.sections:
        peer = build_peer(cache)
        rows = []
        for seconds in (10, 60):
            audio = speech_file(cache, seconds)
            for _ in range(args.repeats if seconds == 10 else 1):
                for name, bundle in bundles.items():
                    rows.append({"system": name, "seconds": seconds, **qasr_run(checkpoint, bundle, audio, args)})
                    print(_line(rows[-1]), file=sys.stderr, flush=True)
                rows.append({"system": "antirez/qwen-asr", "seconds": seconds,
                             **peer_run(peer, checkpoint, audio, args)})
                print(_line(rows[-1]), file=sys.stderr, flush=True)
        bandwidth = max(measure_bandwidth(args.threads), bandwidth)
        (work / "runs.json").write_text(json.dumps(rows, indent=1))
        _keep(work, "speed", speed_table(rows, bundles, bandwidth, args))
    if "accuracy" in args.sections:
        _keep(work, "accuracy", accuracy(bundles, args))
    head = (f"## Quantized weights (int8, int4) on the CPU\n\n{datetime.date.today()}, `"
            f"python scripts/bench_quant.py --steps {args.steps} --repeats {args.repeats} [--sections ...]` "
            f"({args.threads} threads; the sections ran as separate runs, so that other jobs could run "
            f"between them)\n\n{describe_machine()}. The machine was shared with other engineers' jobs while this "
            "ran; every figure is a ratio to peers measured in the same run.")
    text = "\n\n".join([head, *[(work / f"{name}.md").read_text() for name in SECTIONS if (work / f"{name}.md").is_file()]])
    publish(text, BEGIN, END, write=not args.no_write)
    return 0


def _keep(work: Path, name: str, text: str) -> None:
    """A measured section, kept in the cache until the next run of that section."""
    (work / f"{name}.md").write_text(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24, help="decode steps timed for the per-token median")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per system on 10 s (60 s: one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="what to measure now; the document gets every section measured so far")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--sweep-worker", help=argparse.SUPPRESS)
    p.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--audio", type=Path, help=argparse.SUPPRESS)
    return p


# -- bundles ---------------------------------------------------------------------------------------
def build(fp32: Path, work: Path, weights: str, encoder_weights: str, prepacked: bool) -> Path:
    """The fp32 bundle, or its quantized copy (made once), with BUNDLE/prepacked/ only where asked."""
    from qasr.export.quantize import SCHEMES, quantize_bundle
    from qasr.runtime.bundle import Bundle
    from qasr.runtime.backends.onnxruntime_cpu import session_options
    from qasr.runtime.backends.prepack import prepacked_graph, write_prepacked
    from qasr.runtime.bundle import PREPACKED

    if weights == encoder_weights == "fp32":
        return fp32
    tag = "-".join(f"{w}b{SCHEMES[w].block_size}{'s' if SCHEMES[w].symmetric else 'a'}{SCHEMES[w].accuracy_level}"
                   for w in dict.fromkeys((weights, encoder_weights)) if w in SCHEMES)
    out = work / f"{weights}-enc{encoder_weights}-{tag}{'-prepacked' if prepacked else ''}"
    if not (out / "manifest.json").is_file():
        quantize_bundle(fp32, out, weights, encoder_weights, progress=lambda line: print(line, file=sys.stderr))
    bundle = Bundle.load(out)
    if prepacked and not prepacked_graph(bundle, "decoder"):
        write_prepacked(bundle, lambda: session_options(2), progress=lambda line: print(line, file=sys.stderr))
    if not prepacked:
        shutil.rmtree(out / PREPACKED, ignore_errors=True)
    return out


def build_peer(cache: Path, source: Path = PEER_SOURCE) -> Path:
    """A local copy of antirez/qwen-asr whose offline token limit reads QWEN_MAX_TOKENS (`make blas`)."""
    peer = cache / "peer" / "qwen-asr"
    binary = peer / "qwen_asr"
    if not binary.is_file():
        peer.mkdir(parents=True, exist_ok=True)
        for file in [*source.glob("*.[ch]"), source / "Makefile"]:
            shutil.copy(file, peer)
        source = (peer / "qwen_asr.c").read_text()
        line = "    int max_tokens = 2048;"
        if line not in source:
            raise SystemExit(f"{peer}/qwen_asr.c: no `{line.strip()}` to patch")
        patched = '    int max_tokens = getenv("QWEN_MAX_TOKENS") ? atoi(getenv("QWEN_MAX_TOKENS")) : 2048;'
        (peer / "qwen_asr.c").write_text(source.replace(line, patched))
        subprocess.run(["make", "blas"], cwd=peer, check=True, capture_output=True)
    return binary


# -- the settings sweep ------------------------------------------------------------------------------
def sweep(fp32: Path, work: Path, audio: Path, args) -> str:
    """Decoder-only variants (the encoder stays fp32): decoder session seconds, decode ms/token, and
    logits teacher-forced along the fp32 run's ids against fp32's. Two interleaved passes over all
    variants; timings are the faster of the two (load from other jobs only ever slows a run down)."""
    from qasr.export.quantize import Scheme, quantize_graph

    variants: dict[str, tuple] = {"fp32": (None, fp32)}
    for bits, block, symmetric, level in SWEEP:
        scheme = Scheme(bits, block, symmetric, level)
        out = work / f"sweep-{bits}-{block}-{'sym' if symmetric else 'asym'}-{level}"
        if not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for item in fp32.iterdir():
                if item.is_file() and not item.name.startswith("decoder.onnx") and item.name != "manifest.json":
                    (out / item.name).symlink_to(item)
            _, settings = quantize_graph(fp32 / "decoder.onnx", out / "decoder.onnx", scheme)
            manifest = json.loads((fp32 / "manifest.json").read_text())
            manifest.update(precision=f"int{bits}", weights={"decoder": settings})
            (out / "manifest.json").write_text(json.dumps(manifest))
        variants[str(scheme)] = (scheme, out)
    reference = work / "sweep-reference.npz"
    reference.unlink(missing_ok=True)
    runs: dict[str, list[dict]] = {}
    for _ in range(2):
        for key, (scheme, path) in variants.items():
            runs.setdefault(key, []).append(sweep_run(path, reference, audio, args))
            print(f"sweep {key}: {runs[key][-1]}", file=sys.stderr, flush=True)
    fp32_ms = min(r["decode_ms"] for r in runs["fp32"])
    lines = ["### Choosing the settings", "",
             "Decoder only (encoder fp32), 10 s of speech, fresh processes, two interleaved passes (timings: the "
             "faster pass); logits teacher-forced along the fp32 bundle's "
             f"{args.steps} greedy ids. accuracy_level 4 = MLAS quantizes the activations to int8 per block "
             "(VNNI dot products); 0 = fp32 activations.", "",
             "| weights | block | symmetric | accuracy_level | decoder data MB | session s | decode ms/tok | "
             "x fp32 | logit cosine mean | top-1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, (scheme, path) in variants.items():
        r = {"session": min(x["session"] for x in runs[key]), "decode_ms": min(x["decode_ms"] for x in runs[key]),
             **{m: runs[key][-1][m] for m in ("cosine", "top1")}}
        size = (path / "decoder.onnx.data").stat().st_size
        cells = ["fp32", "-", "-", "-"] if scheme is None else [
            f"int{scheme.bits}", scheme.block_size, "yes" if scheme.symmetric else "no", scheme.accuracy_level]
        lines.append("| " + " | ".join(map(str, cells)) + f" | {size / 1e6:.0f} | {r['session']:.2f} | "
                     f"{r['decode_ms']:.1f} | {r['decode_ms'] / fp32_ms:.2f} | {r['cosine']:.5f} | {r['top1']:.1%} |")
    for _, path in list(variants.values())[1:]:
        shutil.rmtree(path)
    return "\n".join(lines)


def sweep_run(bundle: Path, reference: Path, audio: Path, args) -> dict:
    """One fresh process; the first run (fp32, no reference file yet) writes the reference ids and logits."""
    command = [sys.executable, __file__, "--sweep-worker", str(bundle), "--reference", str(reference),
               "--audio", str(audio), "--steps", str(args.steps), "--threads", str(args.threads)]
    return json_from_child(command, "sweep worker", env=_env())


def sweep_worker(args) -> dict:
    from qasr.runtime.batch import greedy_decode
    from qasr.runtime.prompt import prompt_ids
    from qasr.runtime.transcribe import Transcriber
    from qasr.runtime.verify import cosine

    began = time.perf_counter()
    model = Transcriber.load(args.sweep_worker, backend="onnxruntime", threads=args.threads)
    model.backend.sessions["decoder"]
    session = time.perf_counter() - began  # the decoder loads beside the encoder: the later of the two
    embeds = model.encode(str(args.audio))
    prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
    stamps: list[float] = []
    if not args.reference.is_file():
        run = greedy_decode(model.backend, prompt, embeds, model.audio_token, args.steps, (), keep_logits=True,
                            on_token=lambda _: stamps.append(time.perf_counter()))
        np.savez(args.reference, ids=np.array(run.tokens), logits=np.stack(run.logits))
        cosines, top1 = [1.0], [True]
    else:
        ref = np.load(args.reference)
        taught = greedy_decode(model.backend, prompt, embeds, model.audio_token, 0, (), keep_logits=True,
                               forced=[int(i) for i in ref["ids"]])
        cosines = [cosine(a, b) for a, b in zip(taught.logits, ref["logits"])]
        top1 = [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(taught.logits, ref["logits"])]
        greedy_decode(model.backend, prompt, embeds, model.audio_token, args.steps, (),
                      on_token=lambda _: stamps.append(time.perf_counter()))
    return {"session": session, "decode_ms": 1000 * float(np.median(np.diff(stamps))),
            "cosine": float(np.mean(cosines)), "top1": float(np.mean(top1))}


# -- speed -------------------------------------------------------------------------------------------
def qasr_run(checkpoint: Path, bundle: Path, audio: Path, args) -> dict:
    """One fresh process of `qasr bench`'s worker, forced to steps + 1 tokens."""
    command = [sys.executable, "-m", "qasr.bench.workers", "qasr-onnxruntime", "--checkpoint", str(checkpoint),
               "--bundle", str(bundle), "--audio", str(audio), "--threads", str(args.threads),
               "--steps", str(args.steps), "--tokens", str(args.steps + 1), "--spawned", repr(time.time())]
    return json_from_child(command, f"qasr worker on {bundle}", env=_env())


def peer_run(binary: Path, checkpoint: Path, audio: Path, args) -> dict:
    """antirez/qwen-asr on the same checkpoint and audio: its --debug stage timings, wall clock, peak RSS."""
    env = {**os.environ, "QWEN_MAX_TOKENS": str(args.steps + 1)}
    began = time.time()
    proc = subprocess.Popen([str(binary), "-d", str(checkpoint), "-i", str(audio), "-t", str(args.threads),
                             "--debug"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - began
    if status:
        raise SystemExit(f"{binary} failed:\n{err[-3000:]}")
    stage = {}
    for line in err.splitlines():
        words = line.strip().split()
        if words and words[0] in ("Mel:", "Encoder:", "Prefill:", "Decode:"):
            inside = line[line.index("(") + 1 : line.index(")")].split(",")
            stage[words[0][:-1]] = float(inside[0].split()[0]) / 1000
            if words[0] == "Decode:":
                stage["decode_ms"] = float(inside[1].split()[0])
    ttft = stage["Mel"] + stage["Encoder"] + stage["Prefill"]
    cold = wall - stage["Decode"]
    return {"load": cold - ttft, "cold_start": cold, "encoder": stage["Encoder"], "ttft": ttft,
            "decode_ms": stage["decode_ms"], "peak_rss_gb": kb_gb(usage.ru_maxrss)}


def speed_table(rows: list[dict], bundles: dict, bandwidth: float, args) -> str:
    from qasr.runtime.bundle import Bundle

    lines = ["### Speed", "",
             f"Median of {args.repeats} fresh processes on 10 s, one on 60 s. load = process start to every weight "
             "ready; cold = process start to the first token of the first call (what a user waits for); "
             f"encoder, ttft (frontend + encoder + prefill) and decode (median of {args.steps} steps) are warm, "
             "after that call; peak = the process's VmHWM. x fp32 / x antirez: ratio of decode ms/token (and of "
             "ttft) to those peers in the same run. antirez/qwen-asr: its own --debug stage times (mel + encoder "
             "+ prefill = ttft; wall clock minus its decode loop = cold), bf16 weights mmapped, peak from wait4.",
             "", "| audio | system | load s | cold s | encoder s | ttft s | ttft x antirez | decode ms/tok | x fp32 "
             "| x antirez | peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    med = {}
    for row in rows:
        med.setdefault((row["seconds"], row["system"]), []).append(row)
    value = {key: {m: statistics.median(r[m] for r in runs) for m in ("load", "cold_start", "encoder", "ttft",
                                                                       "decode_ms", "peak_rss_gb")}
             for key, runs in med.items()}
    for (seconds, system), v in value.items():
        fp, peer = value[(seconds, "fp32")], value[(seconds, "antirez/qwen-asr")]
        lines.append(f"| {seconds} s | {system} | {v['load']:.2f} | {v['cold_start']:.2f} | {v['encoder']:.2f} | "
                     f"{v['ttft']:.2f} | {v['ttft'] / peer['ttft']:.2f} | {v['decode_ms']:.1f} | "
                     f"{v['decode_ms'] / fp['decode_ms']:.2f} | {v['decode_ms'] / peer['decode_ms']:.2f} | "
                     f"{v['peak_rss_gb']:.2f} |")
    lines += ["", "### The floor per precision", "",
              f"Measured read bandwidth {bandwidth:.1f} GB/s (best threaded sum/max over 1 GB, before and after). "
              "A decode step reads every decoder weight once (the decoder's data file: the layers and the tied "
              "head, stored once, with their scales and zero points) plus the fp32 KV cache of its context "
              f"(prompt + {args.steps // 2} tokens); floor = bytes / bandwidth; reached = floor / measured decode.",
              "", "| audio | system | GB per token | floor ms | decode ms | reached |", "|---|---|---|---|---|---|"]
    context = {s: r["prompt_tokens"] + args.steps // 2 for r in rows if "prompt_tokens" in r for s in [r["seconds"]]}
    for (seconds, system), v in value.items():
        if system not in bundles:
            continue
        data = (Bundle.load(bundles[system]).path / "decoder.onnx.data").stat().st_size
        total = data + bytes_per_token("0.6b", 0, 4, context[seconds])
        floor = 1000 * total / (bandwidth * 1e9)
        lines.append(f"| {seconds} s | {system} | {total / 1e9:.2f} | {floor:.1f} | {v['decode_ms']:.1f} | "
                     f"{floor / v['decode_ms']:.0%} |")
    return "\n".join(lines)


# -- accuracy ----------------------------------------------------------------------------------------
def accuracy(bundles: dict, args) -> str:
    clips = [str(ROOT / "tests" / "data" / name) for name in RECORDINGS]
    lines = ["### Accuracy: `qasr verify` against the fp32 bundle", "",
             f"`qasr verify BUNDLE {' '.join(RECORDINGS)} --max-new-tokens 32 --threads {args.threads}` on the "
             "test recordings (tests/data), full-size random 0.6B. Random weights give flat logits (top-1 margins "
             "of a few hundredths, see the bf16 estimate above, where bf16 itself keeps 81 % top-1), so these "
             "figures are pessimistic for trained weights; they compare the formats, not the released model. "
             "The limits `qasr verify` applies per precision are in qasr/runtime/verify.py (LIMITS).", "",
             "| bundle | audio rel. err | audio cosine | logit cosine mean | logit cosine min | top-1 | "
             "ids agreement | first divergence | CER | verify |", "|---|---|---|---|---|---|---|---|---|---|"]
    fp32 = bundles["fp32"]
    checks = [(name, path, fp32) for name, path in bundles.items() if name != "fp32" and "prepacked" not in name]
    checks.append(("int4 against itself", bundles["int4"], bundles["int4"]))
    for name, path, reference in checks:
        command = [sys.executable, "-m", "qasr", "verify", str(path), *clips, "--reference", str(reference),
                   "--max-new-tokens", "32", "--threads", str(args.threads), "--format", "json"]
        done = subprocess.run(command, capture_output=True, text=True, env=_env())
        report = json.loads(done.stdout)
        f = report["figures"]
        divergence = ", ".join("-" if d is None else str(d) for d in f["ids"]["first_divergence"].values())
        lines.append(f"| {name} | {f['audio']['rel_error']:.2e} | {f['audio']['cosine']:.6f} | "
                     f"{f['decoder']['logit_cosine_mean']:.5f} | {f['decoder']['logit_cosine_min']:.5f} | "
                     f"{f['decoder']['top1']:.1%} | {f['ids']['agreement']:.1%} | {divergence} | "
                     f"{f['text']['cer']:.1%} | {'exit 0' if done.returncode == 0 else 'exit 1: ' + report['shortfall']} |")
    return "\n".join(lines)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _line(row: dict) -> str:
    return (f"{row['seconds']} s {row['system']}: cold {row['cold_start']:.2f} s, ttft {row['ttft']:.2f} s, "
            f"decode {row['decode_ms']:.1f} ms/tok, peak {row['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
