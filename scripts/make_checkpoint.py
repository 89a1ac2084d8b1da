"""Write a random Qwen3-ASR / ForcedAligner checkpoint in the official on-disk layout.

    python scripts/make_checkpoint.py OUT_DIR --preset 0.6b --seed 0

Presets: the released shapes (0.6b, 1.7b, aligner) for benchmarks, and tiny test shapes. Never
commit the output: a full-size checkpoint is gigabytes.
"""

import argparse

import torch

from qasr.models.synthetic import PRESETS, make_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--shard-mb", type=int, default=4096, help="largest safetensors shard, in MiB")
    args = parser.parse_args()
    out = make_checkpoint(args.out_dir, args.preset, args.seed, getattr(torch, args.dtype), args.shard_mb << 20)
    print(out)


if __name__ == "__main__":
    main()
