"""The `qasr` command.

Every subcommand reports bad input as one line (`qasr: error: ...`) and a non-zero exit; a
traceback means a bug in qasr, never a problem with the user's files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qasr import __version__
from qasr.errors import QasrError


def main(argv: list[str] | None = None) -> int:
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

    info = commands.add_parser("info", help="describe a checkpoint directory and check its files")
    info.add_argument("path", type=Path, help="a Hugging Face checkpoint directory")
    info.set_defaults(run=run_info)
    return parser


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
