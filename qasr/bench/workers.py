"""One measurement in a fresh process, so cold start and peak memory are those of a user's process:
this project's ONNX Runtime backend, or the official qwen-asr transformers backend (fp32 or bf16),
on the same checkpoint and speech, generation forced to the same number of tokens.

    python -m qasr.bench.workers SYSTEM --checkpoint DIR --bundle DIR --audio WAV --tokens N --steps N --threads N --spawned T

prints one JSON line of figures. The official worker needs the test extras (qwen-asr, torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from qasr.kernels.fbank import log_mel
from qasr.memory import peak_rss_gb
from qasr.runtime.audio import load_audio
from qasr.runtime.batch import greedy_decode
from qasr.runtime.embed import embed_audio
from qasr.runtime.prompt import prompt_ids
from qasr.runtime.transcribe import Transcriber

SYSTEMS = ("official-fp32", "official-bf16", "qasr-onnxruntime")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qasr.bench.workers", description=__doc__.splitlines()[0])
    parser.add_argument("worker", choices=SYSTEMS)
    for name in ("checkpoint", "bundle", "audio", "spawned"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("tokens", "steps", "threads"):
        parser.add_argument(f"--{name}", type=int, required=True)
    print(json.dumps(measure(parser.parse_args(argv))), flush=True)
    return 0


def json_from_child(command: list[str], what: str, **run) -> dict:
    """Run a worker process (`subprocess.run` keywords in `run`): the JSON line it printed last, or
    the benchmark ends with `what` and the end of the worker's stderr."""
    done = subprocess.run(command, capture_output=True, text=True, **run)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    spawned = float(args.spawned)
    if args.worker == "qasr-onnxruntime":
        result = _qasr_worker(args)
    else:
        result = _official_worker(args, args.worker.rsplit("-", 1)[1])
    result["load"] = result.pop("loaded_at") - spawned
    result["cold_start"] = result.pop("first_token_at") - spawned
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def _qasr_worker(args) -> dict:
    model = Transcriber.load(args.bundle, backend="onnxruntime", threads=args.threads)
    loaded = [time.time()]  # the decoder loads in the background: ready when its future is done
    for future in model.backend.sessions.pending.values():
        future.add_done_callback(lambda _: loaded.append(time.time()))
    model.transcribe(args.audio, max_new_tokens=1)  # the user's first call: cold start
    first_token_at = time.time()
    wave = load_audio(args.audio)
    frontend = _time(lambda: log_mel(wave))
    encoder = _time(lambda: embed_audio(model.backend, wave, model.window_frames)) - frontend
    stamps: list[float] = []
    began = time.perf_counter()
    embeds = embed_audio(model.backend, wave, model.window_frames)
    prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
    greedy_decode(model.backend, prompt, embeds, model.audio_token, args.tokens, eos_ids=(),
                  on_token=lambda _: stamps.append(time.perf_counter()))
    return _figures(max(loaded), first_token_at, frontend, encoder, began, stamps, args.steps, len(prompt),
                    len(wave) / 16000)


def _official_worker(args, precision: str) -> dict:
    import torch
    from qwen_asr import Qwen3ASRModel
    from qwen_asr.inference.utils import normalize_audio_input
    from transformers import LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Qwen3ASRModel.from_pretrained(args.checkpoint, dtype=dtype, max_new_tokens=1)
    loaded_at = time.time()
    model.transcribe(str(args.audio))  # the user's first call: cold start
    first_token_at = time.time()
    wave = normalize_audio_input(str(args.audio))
    prompt = model._build_text_prompt("", None)
    stamps: list[float] = []
    frontend = _time(lambda: model.processor(text=[prompt], audio=[wave], return_tensors="pt", padding=True))
    inputs = model.processor(text=[prompt], audio=[wave], return_tensors="pt", padding=True).to(dtype)
    thinker = model.model.thinker
    with torch.no_grad():
        encoder = _time(lambda: thinker.get_audio_features(
            inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]))

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    began = time.perf_counter()
    inputs = model.processor(text=[prompt], audio=[wave], return_tensors="pt", padding=True).to(dtype)
    model.model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                         logits_processor=LogitsProcessorList([Clock()]))
    return _figures(loaded_at, first_token_at, frontend, encoder, began, stamps, args.steps,
                    inputs["input_ids"].shape[1], len(wave) / 16000)


def _time(stage) -> float:
    """Seconds of one run of `stage`, after the cold first call has warmed every stage."""
    began = time.perf_counter()
    stage()
    return time.perf_counter() - began


def _figures(loaded_at, first_token_at, frontend, encoder, began, stamps, steps, prompt_tokens, seconds) -> dict:
    """Figures from one forced, warm generation (`stamps`: the time each token was chosen), with
    the wall-clock times every weight was ready and the cold first call had its token."""
    steps_s = np.diff(stamps[: steps + 1])
    return {
        "loaded_at": loaded_at, "frontend": frontend, "encoder": encoder,
        "ttft": stamps[0] - began,  # the frontend, the encoder and the prefill
        "decode_ms": 1000 * float(np.median(steps_s)),
        "e2e": stamps[-1] - began, "rtf": (stamps[-1] - began) / seconds,
        "prompt_tokens": prompt_tokens, "tokens": len(stamps),
        "first_token_at": first_token_at,
    }


if __name__ == "__main__":
    sys.exit(main())
