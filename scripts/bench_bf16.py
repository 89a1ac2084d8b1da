#!/usr/bin/env python
"""Estimate bf16 accuracy from the torch reference, and write the table into docs/benchmarks.md.

    python scripts/bench_bf16.py [--presets 0.6b 1.7b] [--seconds 10] [--steps 32] [--work DIR] [--no-write]

For each full-size random checkpoint (generated into --work, never into the repo) the fp32
reference decodes `--steps` greedy tokens after real speech (the tests/data fixtures,
concatenated); then the same model in bf16 is teacher-forced along those tokens and compared
step by step: cosine of the logits, top-1 agreement, and the audio embeddings' error. The bf16
reference keeps RoPE angles in fp32, as the derived bf16 ONNX graphs do (qasr.export.precision
keeps index math in fp32). Random weights are no substitute for the real model's activations,
so this is an estimate of the arithmetic, not of WER. Slow on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_audio import concatenated_speech  # noqa: E402

from qasr.bench.docs import write_section  # noqa: E402
from qasr.bench.harness import DEFAULT_CACHE, describe_machine, prepare  # noqa: E402
from qasr.kernels.fbank import log_mel  # noqa: E402
from qasr.models.thinker import Thinker  # noqa: E402
from qasr.runtime.prompt import prompt_ids  # noqa: E402
from qasr.runtime.tokenizer import Tokenizer  # noqa: E402

BEGIN, END = "<!-- bf16:begin -->", "<!-- bf16:end -->"
DOC = ROOT / "docs" / "benchmarks.md"


def compare(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> tuple[float, float, float, float, float]:
    """(min cosine, mean cosine, top-1 agreement, median fp32 top-1 margin, median max |error|) over the steps."""
    cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(reference, logits)]
    agree = [int(a.argmax()) == int(b.argmax()) for a, b in zip(reference, logits)]
    margins = [float(a.topk(2).values[0] - a.topk(2).values[1]) for a in reference]
    errors = [float((a - b).abs().max()) for a, b in zip(reference, logits)]
    return (min(cosines), sum(cosines) / len(cosines), sum(agree) / len(agree), float(np.median(margins)),
            float(np.median(errors)))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).abs().max() / expected.abs().max())


def rows_for(preset: str, work: Path, seconds: int, steps: int) -> list[str]:
    path, _ = prepare(preset, work)
    start = time.perf_counter()
    model = Thinker.from_pretrained(path)
    mel = log_mel(concatenated_speech(seconds))
    embeds32 = model.encode(mel)
    prompt = prompt_ids(Tokenizer.from_dir(path), "", None, len(embeds32))
    reference = model.generate(prompt, embeds32, max_new_tokens=steps, eos_ids=())
    tokens = reference.tokens
    print(f"{preset}: fp32 greedy run of {len(tokens)} tokens after a {len(prompt)}-token prompt", flush=True)
    model.to(torch.bfloat16)
    embeds16 = model.encode(mel)
    logits = [x.float() for x in model.generate(prompt, embeds16, len(tokens), eos_ids=(), forced=tokens).logits]
    low, mean, top1, margin, error = compare(reference.logits, logits)
    free = model.generate(prompt, embeds16, max_new_tokens=steps, eos_ids=()).tokens
    same = next((i for i, (a, b) in enumerate(zip(free, tokens)) if a != b), len(tokens))
    rows = [
        f"| {preset} | {relative_error(embeds16, embeds32):.1e} | {low:.4f} | {mean:.4f} "
        f"| {top1 * 100:.1f} % ({round(top1 * len(tokens))}/{len(tokens)}) | {margin:.3f} | {error:.3f} "
        f"| {same}/{len(tokens)} |"
    ]
    print(rows[-1], flush=True)
    print(f"{preset}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["0.6b", "1.7b"], choices=["0.6b", "1.7b"])
    parser.add_argument("--seconds", type=int, default=10, help="seconds of real speech (the fixtures, repeated)")
    parser.add_argument("--steps", type=int, default=32, help="greedy decode steps compared")
    parser.add_argument("--work", type=Path, default=DEFAULT_CACHE,
                        help="where checkpoints (and bundles) are generated; shared with scripts/bench.py")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    command = " ".join(["python", "scripts/bench_bf16.py", *sys.argv[1:]])
    header = f"## bf16 accuracy estimate (torch reference, bf16 against fp32)\n\n" \
             f"{datetime.date.today().isoformat()}, `{command}`\n\n{describe_machine()}\n"
    print(header, flush=True)
    rows = [
        "| model | audio embeds rel. err | logit cosine min | logit cosine mean "
        "| teacher-forced top-1 | fp32 top-1 margin (median) | max abs logit error (median) "
        "| free-running ids equal to fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for preset in args.presets:
        rows += rows_for(preset, args.work, args.seconds, args.steps)
    text = (
        f"{header}\n{args.seconds} s of real speech (tests/data English and Chinese clips, repeated), full-size "
        f"random checkpoints (`scripts/make_checkpoint.py --preset ...`), greedy decoding for {args.steps} steps "
        "with end-of-sequence ignored; the bf16 model is teacher-forced along the fp32 run's ids.\n\n"
        + "\n".join(rows)
        + "\n\n'audio embeds rel. err' is max |bf16 - fp32| / max |fp32| of the projector output. 'free-running "
        "ids equal' counts the leading ids of the bf16 model's own greedy run that match fp32's. A top-1 flips where "
        "the fp32 margin between the two best logits is below the bf16 logit error: random weights give flat logits "
        "(small margins), trained ones are usually far more decided, so expect fewer flips there. Random weights "
        "stand in for the real model's (no weights can be downloaded here), so the figures estimate the bf16 "
        "arithmetic of this graph layout, not the released models' accuracy. No TensorRT engine ran: TensorRT "
        "bf16 kernels round differently (fp32 accumulation, fused pointwise ops)."
    )
    if not args.no_write:
        write_section(DOC, BEGIN, END, text)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
