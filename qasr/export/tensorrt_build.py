"""`qasr build BUNDLE`: compile a bundle's graphs into TensorRT engines for the GPU it runs on.

The graphs are first derived in the requested precision (qasr.export.precision, strongly typed:
the types come from the ONNX file, so the network is created STRONGLY_TYPED and no precision
flag is set). Each graph is parsed with OnnxParser.parse_from_file (external weights), given
optimization profiles sized from the manifest and the longest audio it must serve, and built
with build_serialized_network, reusing a timing cache. The decoder gets two profiles in one
engine, prefill (one request, S = 1..prefill chunk) and decode (S = 1, B = 1..--max-batch rows on
one shared cache), so its weights exist once. Engines and
a record (TensorRT version, GPU, compute capability, precision, profiles, the bundle's source
hash) go to BUNDLE/engines/, replaced as a whole only when every engine is built.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from qasr.errors import EngineError
from qasr.jsonfile import read_json
from qasr.runtime.align import MAX_SECONDS as ALIGNER_SECONDS
from qasr.runtime.backends.cuda import Cuda
from qasr.runtime.backends.tensorrt_engines import CAPACITY_STEP, RECORD_FORMAT, tensorrt_version
from qasr.runtime.bundle import DERIVED_RECORD, ENGINES, ENGINES_RECORD, Bundle
from qasr.runtime.decode import PREFILL_CHUNK, token_budget
from qasr.runtime.embed import WINDOW_BATCH
from qasr.runtime.windows import CHUNK_FRAMES, token_count, window_count
from qasr.version import __version__

PRECISIONS = ("bf16", "fp16", "fp32")
PROMPT_TOKENS = 256  # chat template plus a context text, beside the audio tokens
ALIGNER_TEXT_TOKENS = 2048  # words and timestamp slots of one aligner pass
TYPICAL_SECONDS = 30  # the opt point of dynamic profiles
MAX_BATCH = 8  # decode rows per step (continuous batching), the default of --max-batch
TIMING_CACHE = "timing.cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="a bundle directory written by `qasr export`")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="bf16 (default; GPUs of compute capability 8.0+), fp16 (older GPUs), fp32 (parity checks)")
    parser.add_argument("--weights", choices=["fp32", "int4"], default="fp32",
                        help="int4: the decoder's weight matrices as block-quantized int4 Q/DQ, weight-only "
                             "(needs a TensorRT that parses opset 21; unverified, see docs/tensorrt.md)")
    parser.add_argument("--max-audio", type=float, default=1200.0, metavar="SECONDS",
                        help="longest audio the engines serve in one pass; sizes the profiles and the KV cache "
                             "(default 1200, the pipeline's one-pass limit; use 300 or less on 8 GB Jetsons)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, metavar="ROWS",
                        help=f"most requests decoded per step (default {MAX_BATCH}); the shared KV cache may "
                             "hold this many of the longest requests")
    parser.add_argument("--workspace", type=int, metavar="MB", help="TensorRT workspace limit (default: TensorRT's)")
    parser.add_argument("--timing-cache", type=Path, metavar="FILE",
                        help=f"timing cache to reuse and update (default: BUNDLE/{ENGINES}/{TIMING_CACHE})")
    parser.add_argument("--graphs-only", action="store_true",
                        help="only derive the graphs in --precision (no TensorRT or GPU needed)")


def run(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    if bundle.fused_decoder:
        raise EngineError(f"{bundle.path}: a fused decoder (ONNX Runtime's ops, which TensorRT does not parse); "
                          "build engines from a bundle exported with --decoder traced")
    if args.max_audio <= 0:
        raise EngineError(f"--max-audio must be positive, not {args.max_audio:g}")
    if args.max_batch < 1:
        raise EngineError(f"--max-batch must be positive, not {args.max_batch}")
    if args.graphs_only:
        print(derive(bundle, args.precision, args.weights))
        return 0
    here = {"tensorrt": tensorrt_version(), **Cuda().device()}
    graphs = derive(bundle, args.precision, args.weights)
    contracts = read_json(graphs / DERIVED_RECORD, EngineError)["graphs"]
    plans = profiles(bundle.manifest, args.max_audio, args.max_batch)
    cache_file = args.timing_cache or bundle.path / ENGINES / TIMING_CACHE
    timing = cache_file.read_bytes() if cache_file.is_file() else b""
    with tempfile.TemporaryDirectory(dir=bundle.path, prefix=f".{ENGINES}.") as tmp:
        staging = Path(tmp)
        engines = {}
        for name, contract in contracts.items():
            print(f"building {name} ({args.precision}) for {here['gpu']}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            plan, timing = build_engine(graphs / contract["file"], contract, plans[name],
                                        args.precision, args.workspace, timing)
            (staging / f"{name}.plan").write_bytes(plan)
            engines[name] = {"file": f"{name}.plan", "graph": str((graphs / contract["file"]).relative_to(bundle.path)),
                             "profiles": plans[name], "build_seconds": round(time.perf_counter() - start, 1)}
        record = {"format": RECORD_FORMAT[0], "format_version": RECORD_FORMAT[1], "qasr_version": __version__,
                  **here, "precision": args.precision, "weights": args.weights, "max_audio_s": args.max_audio,
                  "max_batch": args.max_batch,
                  "source_sha256": bundle.manifest["source"]["sha256"],
                  "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "engines": engines}
        (staging / ENGINES_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        (staging / TIMING_CACHE).write_bytes(timing)
        if args.timing_cache:
            args.timing_cache.write_bytes(timing)
        out = bundle.path / ENGINES
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        staging.mkdir()
    print(out)
    return 0


def derive(bundle: Bundle, precision: str, weights: str = "fp32") -> Path:
    """The derived graphs (imported late: deriving needs onnx, building needs TensorRT)."""
    from qasr.export.precision import derive_bundle

    return derive_bundle(bundle, precision, progress=lambda line: print(line, file=sys.stderr, flush=True),
                         weights=weights)


def capacity_for(manifest: dict, seconds: float) -> int:
    """KV cache rows for one pass over `seconds` of audio: prompt, audio tokens and the token budget."""
    frames = math.ceil(seconds * manifest["audio"]["sample_rate"] / manifest["audio"]["hop"])
    rows = PROMPT_TOKENS + int(token_count(frames)) + token_budget(seconds)
    return -(-rows // CAPACITY_STEP) * CAPACITY_STEP


def profiles(manifest: dict, max_audio: float, max_batch: int = MAX_BATCH) -> dict[str, list[dict[str, list[int]]]]:
    """Per graph, its optimization profiles: symbolic dimension -> [min, opt, max].

    The decoder's prefill profile is one request, reading a copy of its own filled rows; the decode
    profile is up to `max_batch` rows on the shared cache, which holds that many of the longest.
    """
    audio = manifest["audio"]
    frames_per_second = audio["sample_rate"] / audio["hop"]
    frames = math.ceil(max_audio * frames_per_second)
    windows = min(WINDOW_BATCH, window_count(frames, audio["window_frames"]))
    tokens = min(int(token_count(frames)), windows * audio["window_tokens"])  # projected one window batch at a time
    typical = min(tokens, int(token_count(TYPICAL_SECONDS * frames_per_second)))
    capacity = capacity_for(manifest, max_audio)
    cache = [1, min(capacity, capacity_for(manifest, TYPICAL_SECONDS)), capacity]
    chunk = min(PREFILL_CHUNK, capacity)
    plans: dict[str, list[dict[str, list[int]]]] = {
        "encoder": [{"windows": [1, windows, windows], "frames": [CHUNK_FRAMES, audio["window_frames"],
                                                                audio["window_frames"]]}],
        "projector": [{"tokens": [1, typical, tokens]}],
    }
    if "decoder" in manifest["graphs"]:
        one = [1, 1, 1]
        shared = [1, cache[1] * max_batch, capacity * max_batch]
        plans["decoder"] = [
            {"batch": one, "new": [1, chunk, chunk], "audio": [1, chunk, chunk], "capacity": cache},
            {"batch": [1, max_batch, max_batch], "new": one, "audio": one, "capacity": shared},
        ]
    if "aligner" in manifest["graphs"]:
        audio_tokens = int(token_count(math.ceil(min(max_audio, ALIGNER_SECONDS) * frames_per_second)))
        plans["aligner"] = [{"audio": [1, audio_tokens, audio_tokens],
                             "sequence": [1, audio_tokens + 64, audio_tokens + ALIGNER_TEXT_TOKENS]}]
    return plans


def profile_shapes(contract: dict, dims: dict[str, list[int]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) shapes, from the contract's symbolic shapes and the profile's dims."""
    shapes = {}
    for name, value in contract["inputs"].items():
        shapes[name] = tuple(
            tuple(dims[d][i] if isinstance(d, str) else d for d in value["shape"]) for i in range(3))
    return shapes


def build_engine(path: Path, contract: dict, plans: list[dict[str, list[int]]], precision: str,
                 workspace_mb: int | None, timing: bytes) -> tuple[bytes, bytes]:
    """One serialized engine for the graph at `path`, and the updated timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        problem = parser.get_error(0).desc() if parser.num_errors else "unknown error"
        raise EngineError(f"{path}: TensorRT cannot parse it ({problem})")
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # the fp32 engine is the parity reference
    for dims in plans:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(contract, dims).items():
            profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # from another GPU or TensorRT: start afresh
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{path}: TensorRT could not build an engine (its log above says why)")
    return bytes(plan), bytes(cache.serialize())
