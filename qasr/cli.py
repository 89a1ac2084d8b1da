"""The `qasr` command.

Every subcommand reports bad input as one line (`qasr: error: ...`) and a non-zero exit; a
traceback means a bug in qasr, never a problem with the user's files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qasr import __version__
from qasr.errors import QasrError, UsageError
from qasr.export import tensorrt_build
from qasr.runtime.backend import BACKENDS

BATCH_SIZE = 4  # files decoded side by side by `qasr transcribe`: most of the speed-up, a bounded cache


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, options and all (argparse would eat a leading --help)
        from qasr.bench import main as bench

        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except QasrError as exc:
        print(f"qasr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qasr: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qasr", description="Qwen3-ASR on ONNX Runtime and TensorRT.")
    parser.add_argument("--version", action="version", version=f"qasr {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    export = commands.add_parser("export", help="export a checkpoint to a bundle of ONNX graphs")
    export.add_argument("checkpoint", help="a local checkpoint directory, or a Hugging Face model id")
    export.add_argument("--out", required=True, type=Path, help="the bundle directory to write")
    export.set_defaults(run=run_export)

    transcribe = commands.add_parser("transcribe", help="transcribe audio files with a bundle")
    transcribe.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, opus, mp3, ...)")
    transcribe.add_argument("--model", required=True, type=Path, help="an ASR bundle directory")
    transcribe.add_argument("--language", help="force the output language (default: identify it)")
    transcribe.add_argument("--context", default="", help="background text: names, terms, a previous transcript")
    transcribe.add_argument("--max-new-tokens", type=_positive, help="cap the token budget (default grows with the audio)")
    transcribe.add_argument("--format", choices=["txt", "json", "srt", "vtt"], default="txt",
                            help="srt and vtt need --aligner")
    transcribe.add_argument("--output-dir", type=Path, help="write one file per input here instead of to stdout")
    transcribe.add_argument("--aligner", type=Path, help="a forced-aligner bundle, for word timestamps")
    transcribe.add_argument("--timestamps", action="store_true", help="add word times (needs --aligner)")
    transcribe.add_argument("--batch-size", type=_positive, default=BATCH_SIZE,
                            help=f"decode up to this many files per step (default {BATCH_SIZE}; each row holds "
                                 "its own KV cache, about 65 MB for a 10 s file with the 0.6B model in fp32)")
    _backend_options(transcribe)
    transcribe.set_defaults(run=run_transcribe)

    build = commands.add_parser("build", help="build TensorRT engines for this GPU into a bundle")
    tensorrt_build.add_arguments(build)
    build.set_defaults(run=tensorrt_build.run)

    align = commands.add_parser("align", help="time the words of a known transcript in its audio")
    align.add_argument("audio", help="an audio file (at most 180 s)")
    align.add_argument("text", help="the transcript, or a UTF-8 text file holding it")
    align.add_argument("--aligner", required=True, type=Path, help="a forced-aligner bundle")
    align.add_argument("--language", help="the transcript's language (default: guessed from its script)")
    align.add_argument("--format", choices=["json", "srt", "vtt"], default="json")
    _backend_options(align)
    align.set_defaults(run=run_align)

    commands.add_parser("bench", help="benchmark against the official backend (`qasr bench --help`)")

    info = commands.add_parser("info", help="describe a checkpoint directory and check its files")
    info.add_argument("path", type=Path, help="a Hugging Face checkpoint directory")
    info.set_defaults(run=run_info)
    return parser


def _backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: TensorRT where the bundle has engines, else ONNX Runtime on CUDA, else CPU")
    parser.add_argument("--threads", type=_positive, help="CPU threads for ONNX Runtime (default: all cores)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def run_export(args: argparse.Namespace) -> int:
    from qasr.export.onnx_export import export_bundle, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    out = export_bundle(checkpoint, args.out, progress=lambda line: print(line, file=sys.stderr))
    print(out)
    return 0


def run_transcribe(args: argparse.Namespace) -> int:
    from qasr.runtime.align import Aligner
    from qasr.runtime.formats import render
    from qasr.runtime.prompt import check_language
    from qasr.runtime.transcribe import Transcriber

    timestamps = args.timestamps or args.format in ("srt", "vtt")
    if timestamps and not args.aligner:
        raise UsageError(f"{'--format ' + args.format if not args.timestamps else '--timestamps'} needs word "
                         "times: add --aligner BUNDLE")
    model = Transcriber.load(args.model, backend=args.backend, threads=args.threads)
    aligner = Aligner.load(args.aligner, backend=args.backend, threads=args.threads) if timestamps else None
    language = check_language(args.language, model.languages) if args.language else None
    names = _output_names(args.audio) if args.output_dir else {}
    failed = 0
    results = model.transcribe_many(args.audio, batch_size=min(args.batch_size, len(args.audio)), language=language,
                                    context=args.context, aligner=aligner, max_new_tokens=args.max_new_tokens,
                                    progress=sys.stderr.isatty())
    for audio, result in results:
        try:
            if isinstance(result, QasrError):
                raise result
            text = render(result, args.format)
        except QasrError as exc:
            print(f"qasr: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        if result.truncated:
            print(f"qasr: warning: {audio}: the token budget ran out after {len(result.token_ids)} tokens; "
                  "the text may be cut (raise --max-new-tokens)", file=sys.stderr)
        if args.output_dir:
            _write(args.output_dir / f"{names[audio]}.{args.format}", text)
        elif len(args.audio) > 1 and args.format == "txt":
            print(f"==> {audio} <==\n{text}", end="", flush=True)
        else:
            print(text, end="", flush=True)
    return 1 if failed else 0


def run_align(args: argparse.Namespace) -> int:
    from qasr.runtime.align import Aligner
    from qasr.runtime.formats import subtitle_segments, to_srt, to_vtt

    text = _read_text(args.text)
    aligner = Aligner.load(args.aligner, backend=args.backend, threads=args.threads)
    language = args.language or guess_language(text)
    words = aligner.align(args.audio, text, language)
    if args.format == "json":
        out = {"audio": args.audio, "language": language, "text": text, "words": [vars(w) for w in words]}
        print(json.dumps(out, ensure_ascii=False))
    else:
        segments = subtitle_segments(text, words)
        print(to_srt(segments) if args.format == "srt" else to_vtt(segments), end="")
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
    """Write through a temporary file, so an interrupted run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def run_info(args: argparse.Namespace) -> int:
    from qasr.models.checkpoint import check_checkpoint, parameter_counts
    from qasr.models.config import load_config

    config = load_config(args.path)
    check_checkpoint(args.path, config)
    print(describe_config(config, parameter_counts(config), str(args.path)))
    return 0


def describe_config(config, counts: dict[str, int], source: str) -> str:
    a, t = config.audio, config.text
    kind = "Qwen3-ForcedAligner" if config.is_aligner else "Qwen3-ASR"
    head = (f"{config.classify_num} time classes x {config.timestamp_segment_time:g} ms" if config.is_aligner
            else "tied to the embedding" if config.tied_head else f"{t.vocab_size} rows, untied")
    sizes = ", ".join(f"{part} {_count(n)}" for part, n in counts.items() if n)
    return "\n".join([
        f"{kind} checkpoint {source}",
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
