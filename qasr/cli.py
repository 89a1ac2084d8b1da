"""The `qasr` command.

Every subcommand reports bad input as one line (`qasr: error: ...`) and a non-zero exit; a
traceback means a bug in qasr, never a problem with the user's files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qasr import stream_cli
from qasr.cache import writable_dir
from qasr.errors import QasrError, UsageError
from qasr.export import tensorrt_build
from qasr.memory import gb
from qasr.models.checkpoint import check_checkpoint, parameter_counts
from qasr.models.config import ModelConfig, load_config
from qasr.runtime.align import Aligner
from qasr.runtime.backends.interface import PRECISIONS
from qasr.runtime.backends.onnxruntime_cpu import session_options, share_threads
from qasr.runtime.backends.prepack import write_prepacked
from qasr.runtime.backends.select import CHOICES
from qasr.runtime.bundle import MANIFEST, Bundle
from qasr.runtime.formats import FORMATS, render
from qasr.runtime.options import TranscribeOptions
from qasr.runtime.prompt import check_language
from qasr.runtime.resolve import DEFAULT_ALIGNER, DEFAULT_MODEL, cached_export, checkpoint_dir, preflight
from qasr.runtime.results import Transcript
from qasr.runtime.transcribe import Transcriber
from qasr.runtime.verify import verify
from qasr.version import __version__

SUBTITLES = [name for name, f in FORMATS.items() if f.needs_words]
BATCH_SIZE = 4  # files decoded side by side by `qasr transcribe`: most of the speed-up, a bounded cache


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, options and all (argparse would eat a leading --help)
        from qasr.bench.official import main as bench

        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    if hasattr(args, "threads"):  # a command that runs models: this process is qasr's own
        share_threads(args.threads)
    try:
        return args.run(args) or 0
    except QasrError as exc:
        print(f"qasr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qasr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qasr ... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qasr", description="Qwen3-ASR on ONNX Runtime and TensorRT.")
    parser.add_argument("--version", action="version", version=f"qasr {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    export = commands.add_parser("export", help="export a checkpoint to a bundle of ONNX graphs")
    export.add_argument("checkpoint", help="a local checkpoint directory, a Hugging Face model id, or an fp32 "
                                           "bundle to quantize (no torch needed)")
    export.add_argument("--out", type=Path, help="the bundle directory to write (default: into qasr's model "
                        "cache, where --model finds it)")
    _weights_options(export)
    export.add_argument("--decoder", choices=["traced", "fused"], default="traced",
                        help="the decoder graph: traced from the PyTorch model (every backend), or fused from "
                             "the checkpoint's tensors (ONNX Runtime's GroupQueryAttention; the onnxruntime "
                             "and onnxruntime-cuda backends; needs --out)")
    export.add_argument("--prepack", action="store_true",
                        help="also save the graphs with their weights packed for this CPU and ONNX Runtime "
                             "(a faster cold start here; other machines use the portable graphs)")
    export.set_defaults(run=run_export)

    transcribe = commands.add_parser("transcribe", help="transcribe audio files with a bundle")
    transcribe.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, opus, mp3, ...)")
    _model_option(transcribe)
    transcribe.add_argument("--language", help="force the output language (default: identify it)")
    transcribe.add_argument("--context", default="", help="background text: names, terms, a previous transcript")
    transcribe.add_argument("--max-new-tokens", type=_positive,
                            help="the token budget per pass (default grows with the audio: 32 + 10 per second)")
    transcribe.add_argument("--loop-guard", action="store_true",
                            help="end a repetition loop after 20 repeats and continue its ids to the budget "
                                 "without decoding them (the same text when the loop would have lasted)")
    transcribe.add_argument("--format", choices=list(FORMATS), default="txt",
                            help=f"{' and '.join(SUBTITLES)} need --aligner")
    transcribe.add_argument("--output-dir", type=Path, help="write one file per input here instead of to stdout")
    transcribe.add_argument("--aligner", help=f"the forced aligner for word times (default with --timestamps or "
                            f"srt/vtt: {DEFAULT_ALIGNER})")
    transcribe.add_argument("--timestamps", action="store_true", help="add word times")
    transcribe.add_argument("--batch-size", type=_positive, default=BATCH_SIZE,
                            help=f"decode up to this many files per step (default {BATCH_SIZE}; each row holds "
                                 "its own KV cache, about 65 MB for a 10 s file with the 0.6B model in fp32)")
    _backend_options(transcribe)
    transcribe.set_defaults(run=run_transcribe)

    stream = commands.add_parser("stream", help="transcribe live audio (a file, or raw PCM on stdin) as it comes")
    stream_cli.add_arguments(stream)
    _model_option(stream)
    _backend_options(stream)
    stream.set_defaults(run=stream_cli.run)

    build = commands.add_parser("build", help="build TensorRT engines for this GPU into a bundle")
    tensorrt_build.add_arguments(build)
    build.set_defaults(run=tensorrt_build.run)

    align = commands.add_parser("align", help="time the words of a known transcript in its audio")
    align.add_argument("audio", help="an audio file (at most 180 s)")
    align.add_argument("text", help="the transcript, or a UTF-8 text file holding it")
    align.add_argument("--aligner", default=DEFAULT_ALIGNER, help="a forced-aligner bundle, checkpoint directory "
                       f"or Hugging Face id (default: {DEFAULT_ALIGNER})")
    align.add_argument("--language", help="the transcript's language (default: guessed from its script)")
    align.add_argument("--format", choices=["json", *SUBTITLES], default="json")
    _backend_options(align)
    align.set_defaults(run=run_align)

    verify = commands.add_parser("verify", help="check a bundle (any precision, any backend) against fp32 on "
                                                "your audio")
    verify.add_argument("model", help="the bundle to check")
    verify.add_argument("audio", nargs="+", help="audio files (at most 20 minutes each)")
    verify.add_argument("--reference", help="the fp32 bundle or checkpoint to compare with (default: the fp32 "
                                            "bundle the model was quantized from, when its manifest records one)")
    verify.add_argument("--format", choices=["text", "json"], default="text")
    verify.add_argument("--max-new-tokens", type=_positive, help="cap the token budget (default grows with the audio)")
    verify.add_argument("--text", action="append", help="the true transcript of an audio file, or a UTF-8 file "
                        "holding it; once per audio, in order: adds each run's CER against it")
    _backend_options(verify)
    verify.set_defaults(run=run_verify)

    commands.add_parser("bench", help="benchmark against the official backend (`qasr bench --help`)")

    serve = commands.add_parser("serve", help="an OpenAI-compatible server and a web page (needs the serve extra)")
    _model_option(serve)
    serve.add_argument("--aligner", help="a forced aligner (bundle, checkpoint or Hugging Face id): word times, "
                       "srt and vtt")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("QASR_API_KEY"),
                       help="require this key (Authorization: Bearer KEY); default $QASR_API_KEY")
    serve.add_argument("--max-upload-mb", type=float, default=100.0, help="largest upload accepted (413 past it)")
    serve.add_argument("--max-queue", type=_positive, default=16, help="requests that may wait (429 past it)")
    serve.add_argument("--max-batch", type=_positive, default=8,
                       help="requests decoded together in each step (1: one at a time)")
    serve.add_argument("--max-new-tokens", type=_positive, help="cap the token budget per request")
    serve.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    serve.add_argument("--drain-seconds", type=int, default=30, help="on SIGTERM, time given to work in flight")
    serve.add_argument("--ray", metavar="ADDRESS", help="deploy onto the running Ray cluster at ADDRESS (auto, or "
                       "host:port of `ray start --head`); needs the ray extra (docs/ray.md)")
    serve.add_argument("--replicas", default="1", help="with --ray: replicas of the model, N, auto or MIN-MAX "
                       "(autoscaling on requests in flight)")
    serve.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs each replica "
                       "reserves (fractions share one)")
    serve.add_argument("--cpus-per-replica", type=float, help="with --ray: CPUs each replica reserves "
                       "(default: --threads, else 1)")
    _backend_options(serve)
    serve.set_defaults(run=run_serve)

    info = commands.add_parser("info", help="describe a model (bundle, checkpoint or hub id) and check its files")
    info.add_argument("path", help="a bundle, a checkpoint directory or a Hugging Face id")
    info.set_defaults(run=run_info)
    return parser


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a bundle, a checkpoint directory or a Hugging Face id[@revision]; a checkpoint is "
                             f"exported once into the cache (default: {DEFAULT_MODEL})")
    _weights_options(parser, "for a checkpoint or hub id, the cached export's ")


def _weights_options(parser: argparse.ArgumentParser, scope: str = "") -> None:
    parser.add_argument("--weights", choices=["fp32", "int8", "int4"], default="fp32",
                        help=f"{scope}decoder (or aligner) weights, head and embedding included (default fp32)")
    parser.add_argument("--encoder-weights", choices=["fp32", "int8"], default="fp32",
                        help=f"{scope}audio encoder and projector weights (default fp32)")


def _backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=CHOICES, default="auto",
                        help="auto: TensorRT where the bundle has engines, else ONNX Runtime on CUDA, else CPU")
    parser.add_argument("--threads", type=_positive, help="CPU threads for ONNX Runtime (default: all cores)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="GPU compute type: auto (fp16 graphs on onnxruntime-cuda, the engines' own on "
                             "TensorRT), fp32, fp16 or bf16; derived graphs are made once and kept in the bundle")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def run_export(args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr)

    if args.out is not None:  # before a download or an export is spent
        writable_dir(args.out.parent, "the bundle's parent directory")
    if (Path(args.checkpoint) / "manifest.json").is_file():  # an fp32 bundle: the post-pass alone
        from qasr.export.quantize import quantize_bundle

        if args.out is None:
            raise UsageError(f"{args.checkpoint}: quantizing a bundle needs --out DIR")
        out = quantize_bundle(args.checkpoint, args.out, args.weights, args.encoder_weights, progress)
    else:
        checkpoint = checkpoint_dir(args.checkpoint)
        if args.out is None:
            if args.decoder != "traced":
                raise UsageError("--decoder fused writes a bundle of its own: give --out DIR")
            out = cached_export(checkpoint, args.weights, name=args.checkpoint, encoder_weights=args.encoder_weights)
        else:
            from qasr.export.onnx_export import export_bundle

            memory, disk = preflight(checkpoint, args.out.parent, args.weights, args.encoder_weights, args.checkpoint)
            progress(f"exporting needs about {gb(memory)} of memory and {gb(disk)} of disk")
            out = export_bundle(checkpoint, args.out, progress=progress, weights=args.weights,
                                encoder_weights=args.encoder_weights, decoder=args.decoder)
    if args.prepack:
        write_prepacked(Bundle.load(out), lambda: session_options(None), progress)
    print(out)
    return 0


def run_transcribe(args: argparse.Namespace) -> int:
    if args.output_dir:
        writable_dir(args.output_dir, "the output directory")
    timestamps = args.timestamps or FORMATS[args.format].needs_words
    # One recording: the decoder loads once it is encoded and the encoder freed (release_encoder below),
    # so the two are never resident together; several keep the encoder to the last, so they overlap.
    model = Transcriber.load(args.model, backend=args.backend, threads=args.threads, weights=args.weights,
                             encoder_weights=args.encoder_weights, precision=args.precision,
                             background_load=len(args.audio) > 1)
    aligner = (Aligner.load(args.aligner or DEFAULT_ALIGNER, backend=args.backend, threads=args.threads,
                            precision=args.precision)
               if timestamps else None)
    language = check_language(args.language, model.languages) if args.language else None
    names = _output_names(args.audio) if args.output_dir else {}
    failed = 0
    options = TranscribeOptions(language=language, context=args.context, max_new_tokens=args.max_new_tokens,
                                aligner=aligner, loop_guard=args.loop_guard)
    results = model.transcribe_many(args.audio, options, batch_size=min(args.batch_size, len(args.audio)),
                                    progress=sys.stderr.isatty(), release_encoder=True)  # the command ends after
    for audio, result in results:
        try:
            if isinstance(result, QasrError):
                raise result
            text = render(result, args.format)
            if result.truncated:
                print(f"qasr: warning: {audio}: the token budget ran out after {len(result.token_ids)} tokens; "
                      "the text may be cut (raise --max-new-tokens)", file=sys.stderr)
            if args.output_dir:
                _write(args.output_dir / f"{names[audio]}.{args.format}", text)
            elif len(args.audio) > 1 and args.format == "txt":
                print(f"==> {audio} <==\n{text}", end="", flush=True)
            else:
                print(text, end="", flush=True)
        except QasrError as exc:
            print(f"qasr: error: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def run_verify(args: argparse.Namespace) -> int:
    """Exit 0 within the limits of the precision under test, 1 with one line naming the stage otherwise."""
    report = verify(args.model, args.audio, reference=args.reference, backend=args.backend, threads=args.threads,
                    max_new_tokens=args.max_new_tokens, precision=args.precision,
                    texts=args.text and [_read_text(t) for t in args.text])
    print(json.dumps(report.to_dict(), ensure_ascii=False) if args.format == "json" else report.to_text(), end="")
    print("" if args.format == "text" else "\n", end="")
    shortfall = report.shortfall()
    if shortfall:
        print(f"qasr: verify: {shortfall}", file=sys.stderr)
    return 1 if shortfall else 0


def run_align(args: argparse.Namespace) -> int:
    text = _read_text(args.text)
    aligner = Aligner.load(args.aligner, backend=args.backend, threads=args.threads, precision=args.precision)
    language = args.language or guess_language(text)
    words = aligner.align(args.audio, text, language)
    if args.format == "json":
        out = {"audio": args.audio, "language": language, "text": text, "words": [vars(w) for w in words]}
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(render(Transcript(text, language, [], audio=args.audio, words=words), args.format), end="")
    return 0


def _read_text(value: str) -> str:
    """The argument itself, or the contents of the file it names."""
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: cannot read the transcript as UTF-8 text ({exc})") from None
    return value


def guess_language(text: str) -> str:
    """Japanese or Korean by their scripts (they need their own word splitters), else English.

    Only the splitting depends on the language: every other language, Chinese included, is cut
    at spaces and into single ideographs alike.
    """
    if any("\u3040" <= ch <= "\u30ff" for ch in text):
        return "Japanese"
    if any("\uac00" <= ch <= "\ud7a3" or "\u1100" <= ch <= "\u11ff" for ch in text):
        return "Korean"
    return "English"


def _output_names(paths: list[str]) -> dict[str, str]:
    """One output stem per input: the file's stem, numbered where two inputs share one."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem = base = Path(path).stem or "audio"
        n = 1
        while stem in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem)
        names[path] = stem
    return names


def _write(path: Path, text: str) -> None:
    """Write through a temporary file, so an interrupted run never leaves half a result.

    The directory was checked before any work (writable_dir); a failure here (a full disk) is one
    line for this file, and the other files go on."""
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the result ({exc.strerror or exc})") from None


def run_serve(args: argparse.Namespace) -> int:
    from qasr.serve import require_extra

    require_extra()
    from qasr.serve.server import serve
    from qasr.serve.service import Options

    options = Options(model=args.model, aligner=args.aligner, backend=args.backend, threads=args.threads,
                      precision=args.precision, weights=args.weights, encoder_weights=args.encoder_weights,
                      api_key=args.api_key or None, max_upload_mb=args.max_upload_mb, max_queue=args.max_queue,
                      max_batch=args.max_batch, max_new_tokens=args.max_new_tokens, cors_origins=args.cors_origin,
                      drain_seconds=args.drain_seconds)
    if args.ray:
        from qasr.serve import require_ray

        require_ray()
        from qasr.serve import ray

        placement = ray.Placement(args.replicas, args.gpus_per_replica, args.cpus_per_replica)
        return ray.run(options, placement, args.ray, args.host, args.port)
    return serve(options, args.host, args.port)


def run_info(args: argparse.Namespace) -> int:
    if (Path(args.path) / MANIFEST).is_file():
        bundle = Bundle.load(args.path)
        config = ModelConfig.from_dict(bundle.model)
        source = f"bundle {args.path} ({bundle.manifest['precision']}, from {bundle.manifest['source']['checkpoint']})"
    else:
        path = checkpoint_dir(args.path)
        config = load_config(path)
        try:
            check_checkpoint(path, config)
        except ImportError:
            raise UsageError(f"{path}: checking a checkpoint's weight files needs the export extra: "
                             'pip install "qwen3-asr-edge[export]"') from None
        source = f"checkpoint {args.path}"
    print(describe_config(config, parameter_counts(config), source))
    return 0


def describe_config(config, counts: dict[str, int], source: str) -> str:
    a, t = config.audio, config.text
    kind = "Qwen3-ForcedAligner" if config.is_aligner else "Qwen3-ASR"
    head = (f"{config.classify_num} time classes x {config.timestamp_segment_time:g} ms" if config.is_aligner
            else "tied to the embedding" if config.tied_head else f"{t.vocab_size} rows, untied")
    sizes = ", ".join(f"{part} {_count(n)}" for part, n in counts.items() if n)
    return "\n".join([
        f"{kind} {source}",
        f"  encoder     {a.encoder_layers} layers, d_model {a.d_model}, {a.encoder_attention_heads} heads, "
        f"ffn {a.encoder_ffn_dim}, conv {a.downsample_hidden_size} channels, {a.window_frames // 100} s windows",
        f"  projector   {a.d_model} -> {a.output_dim}",
        f"  decoder     {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} q / "
        f"{t.num_key_value_heads} kv heads x {t.head_dim}, ffn {t.intermediate_size}, vocab {t.vocab_size}, "
        f"rope theta {t.rope_theta:,.0f}",
        f"  head        {head}",
        f"  parameters  {sizes} (total {_count(sum(counts.values()))})",
        f"  languages   {len(config.support_languages)}: {', '.join(config.support_languages)}",
    ])


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n / 1e3:.1f} k"


if __name__ == "__main__":
    sys.exit(main())
