"""Accuracy of the demo model (models/qwen3-asr-demo) on held-out synthesized speech, on every path.

    python scripts/bench_demo.py [--count 20] [--seed 7] [--threads 2]

New sentences from the model's word lists, spoken by espeak-ng with the voice and speed its
training never used (qasr.models.demo_data.held_out_clips). The same clips go through: the fp32
bundle on ONNX Runtime, int8 weights, int4 weights with the int8 encoder, the fused decoder (fp32,
and int4 with the int8 encoder), `qasr stream` (default
segments and --segment-seconds 0), `qasr serve` through the openai SDK, and the official qwen-asr
package loading the checkpoint; then `qasr verify --text` of the quantized bundles; then the
same clips with quiet around them or heard twice (`margins`), as a microphone delivers speech. CER is
over all clips together (qasr.runtime.verify.corpus_cer: lowercase, no punctuation, CJK unspaced).
Writes the "Demo model" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qasr.bench.docs import write_section  # noqa: E402
from qasr.bench.harness import describe_machine  # noqa: E402
from qasr.cli import main as qasr_main  # noqa: E402
from qasr.export.onnx_export import export_bundle  # noqa: E402
from qasr.export.quantize import quantize_bundle  # noqa: E402
from qasr.models.demo_data import LANGUAGES, held_out_clips, join, with_quiet  # noqa: E402
from qasr.runtime.bundle import Bundle  # noqa: E402
from qasr.runtime.transcribe import Transcriber  # noqa: E402
from qasr.runtime.verify import corpus_cer, verify  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"
MODEL = ROOT / "models" / "qwen3-asr-demo"


def cer(texts: list[str], truth: list[str]) -> float:
    return corpus_cer(zip(texts, truth))


def cli(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if qasr_main([str(a) for a in argv]) != 0:
            raise RuntimeError(f"qasr {' '.join(map(str, argv))} failed")
    return out.getvalue()


def offline(bundle: Path, clips, threads: int) -> list[tuple[str, str]]:
    model = Transcriber.load(str(bundle), backend="onnxruntime", threads=threads)
    return [(r.language, r.text) for r in (model.transcribe(path) for path, _, _ in clips)]


def streamed(bundle: Path, clips, segment: str | None) -> list[str]:
    texts = []
    for path, _, _ in clips:
        extra = ["--segment-seconds", segment] if segment is not None else []
        texts.append(json.loads(cli("stream", path, "--model", bundle, "--format", "jsonl", *extra)
                                .splitlines()[-1])["text"])
    return texts


def served(bundle: Path, clips, threads: int) -> list[str]:
    """Texts from `qasr serve` (a child process on a free loopback port) through the openai SDK."""
    import httpx2 as httpx  # the HTTP client the openai SDK ships with
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "qasr", "serve", "--model", str(bundle), "--port", str(port),
                               "--backend", "onnxruntime", "--threads", str(threads)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        texts = []
        for path, _, _ in clips:
            with open(path, "rb") as f:
                texts.append(client.audio.transcriptions.create(model="qasr", file=f).text)
        return texts
    finally:
        server.terminate()
        server.wait(30)


MARGINS = (  # (label, seconds of quiet before, after, noise level of the quiet, times the clip is heard)
    ("0.1 s of zeros after", 0.0, 0.1, 0.0, 1),
    ("1 s of zeros before", 1.0, 0.0, 0.0, 1),
    ("1 s of zeros after", 0.0, 1.0, 0.0, 1),
    ("1 s before, 3 s after", 1.0, 3.0, 0.0, 1),
    ("2 s before, 6 s after (two encoder windows)", 2.0, 6.0, 0.0, 1),
    ("1 s of white noise (rms 0.001) either side", 1.0, 1.0, 0.001, 1),
    ("twice, 0.5 s of zeros between", 0.0, 0.0, 0.0, 2),
)


def with_margins(clip, before: float, after: float, noise: float, times: int, seed: int):
    """The clip's samples heard `times` times 0.5 s apart, with quiet around them (demo_data.with_quiet)."""
    import numpy as np

    from qasr.runtime.audio import load_audio

    speech = load_audio(clip)
    speech = np.concatenate([with_quiet(speech, 0.0, 0.5)] * (times - 1) + [speech])
    return with_quiet(speech, before, after, noise, seed)


def margins(bundle: Path, clips, threads: int) -> list[tuple[str, float, float]]:
    """(case, offline CER, `qasr stream` CER) on the clips with quiet around them or repeated (MARGINS)."""
    model = Transcriber.load(str(bundle), backend="onnxruntime", threads=threads)
    rows = []
    for label, before, after, noise, times in MARGINS:
        audios = [with_margins(path, before, after, noise, times, i) for i, (path, _, _) in enumerate(clips)]
        code = {name: lang for lang, name in LANGUAGES.items()}
        truth = [join([text] * times, code[language]) for _, language, text in clips]
        heard = [model.transcribe(audio, sample_rate=16000).text for audio in audios]
        live = []
        for audio in audios:
            stream = model.stream()
            stream.feed(audio)
            live.append(stream.finish()[-1].text)
        rows.append((label, cer(heard, truth), cer(live, truth)))
    return rows


def official(clips) -> list[tuple[str, str]]:
    """The official package loading the checkpoint as anyone would (clips are under 8 s: one window)."""
    import torch
    from qwen_asr import Qwen3ASRModel

    model = Qwen3ASRModel.from_pretrained(str(MODEL), dtype=torch.float32, max_new_tokens=64)
    return [(r.language, r.text) for r in (model.transcribe(audio=path)[0] for path, _, _ in clips)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="qasr-bench-demo-") as tmp:
        work = Path(tmp)
        clips = held_out_clips(MODEL, work, args.count, args.seed)
        truth = [t for _, _, t in clips]
        fp32 = export_bundle(MODEL, work / "fp32", progress=lambda line: None)
        fused = export_bundle(MODEL, work / "fused", progress=lambda line: None, decoder="fused")
        bundles = {"int8": quantize_bundle(fp32, work / "int8", "int8", progress=lambda line: None),
                   "int4 + int8 encoder": quantize_bundle(fp32, work / "int4", "int4", encoder_weights="int8",
                                                          progress=lambda line: None),
                   "fused decoder, fp32": fused,
                   "fused decoder, int4 + int8 encoder": quantize_bundle(
                       fused, work / "fused-int4", "int4", encoder_weights="int8", progress=lambda line: None)}
        rows = []
        base = offline(fp32, clips, args.threads)
        languages = sum(lang == want for (lang, _), (_, want, _) in zip(base, clips))
        rows.append(("fp32, ONNX Runtime (`qasr transcribe`)", cer([t for _, t in base], truth),
                     f"languages {languages}/{len(clips)}"))
        for name, bundle in bundles.items():
            got = offline(bundle, clips, args.threads)
            rows.append((f"{name} weights", cer([t for _, t in got], truth),
                         f"{sum(a == b for a, b in zip(got, base))}/{len(clips)} identical to fp32"))
        for label, segment in (("default segments", None), ("--segment-seconds 0 (official policy)", "0")):
            got = streamed(fp32, clips, segment)
            rows.append((f"`qasr stream`, {label}", cer(got, truth),
                         f"{sum(a == b for a, (_, b) in zip(got, base))}/{len(clips)} identical to offline"))
        got = served(fp32, clips, args.threads)
        rows.append(("`qasr serve` via the openai SDK", cer(got, truth),
                     f"{sum(a == b for a, (_, b) in zip(got, base))}/{len(clips)} identical to the CLI"))
        got = official(clips)
        rows.append(("official qwen-asr 0.0.6 (transformers), same checkpoint", cer([t for _, t in got], truth),
                     f"{sum(a == b for a, b in zip(got, base))}/{len(clips)} identical (language and text) to qasr"))
        paths = [path for path, _, _ in clips]
        checks = {name: verify(str(bundle), paths, texts=truth, backend="onnxruntime", threads=args.threads)
                  for name, bundle in bundles.items() if Bundle.load(bundle).manifest.get("weights")}
        examples = [(lang, text, got) for (_, lang, text), (_, got) in zip(clips[:4], base[:4])]
        quiet = margins(fp32, clips, args.threads)
    text = report(args, started, rows, checks, examples, quiet)
    write_section(DOC, BEGIN, END, text)
    print(text)
    return 0


def report(args, started, rows, checks, examples, quiet) -> str:
    lines = [
        "## Demo model: accuracy on held-out synthesized speech",
        "",
        f"{started:%Y-%m-%d}, `python scripts/bench_demo.py --count {args.count} --seed {args.seed} "
        f"--threads {args.threads}`",
        "",
        describe_machine(),
        "",
        f"The trained demo checkpoint (models/qwen3-asr-demo, docs/demo-model.md) on {args.count} new sentences "
        "(half English, half Mandarin) from its word lists, spoken by espeak-ng with the voice and the speed its "
        "training never used. CER over all clips together, after lowercasing and dropping punctuation.",
        "",
        "| path | CER | agreement |",
        "|---|---|---|",
        *[f"| {name} | {100 * value:.2f} % | {note} |" for name, value, note in rows],
        "",
        "`qasr verify BUNDLE CLIPS... --text ...` against the fp32 bundle:",
        "",
        "| bundle | audio cosine | logit cosine mean | logit cosine min | top-1 | ids agreement (min) | "
        "CER vs fp32 | CER vs text | fp32 CER vs text | verify |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rep in checks.items():
        f = rep.figures()
        shortfall = rep.shortfall()
        lines.append(
            f"| {name} | {f['audio']['cosine']:.6f} | {f['decoder']['logit_cosine_mean']:.5f} | "
            f"{f['decoder']['logit_cosine_min']:.5f} | {f['decoder']['top1']:.1%} | {f['ids']['agreement']:.1%} | "
            f"{f['text']['cer']:.2%} | {f['truth']['cer']:.2%} | {f['truth']['reference_cer']:.2%} | "
            f"{'within the limits' if shortfall is None else 'exit 1: ' + shortfall} |")
    lines += ["", "First clips, fp32 (truth -> transcript):", ""]
    lines += [f"- {lang}: `{text}` -> `{got}`" for lang, text, got in examples]
    lines += ["", "The same clips with quiet around them (zeros unless said), or heard twice (the truth then "
              "twice), fp32; `qasr stream` with its default segments, fed all at once:", "",
              "| clips | CER, `qasr transcribe` | CER, `qasr stream` |", "|---|---|---|",
              *[f"| {label} | {100 * a:.2f} % | {100 * b:.2f} % |" for label, a, b in quiet]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
