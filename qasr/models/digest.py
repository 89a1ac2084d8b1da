"""Which checkpoint a bundle came from: a sha256 of its config and weights, remembered per directory.

A bundle's manifest records it, the model cache is keyed by it, and `qasr verify` refuses a
reference exported from another checkpoint by it. Reading only file names and bytes, it needs
neither torch nor safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qasr.cache import cache_dir
from qasr.errors import CheckpointError
from qasr.models.config import INDEX_FILE, SINGLE_FILE


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 over config.json and the weight files, in name order: which checkpoint a bundle came from.

    Hashing a 1.7B checkpoint reads 4.7 GB, so the digest is remembered per directory against each
    file's size and modification time, and recomputed only when one of them changes.
    """
    files = [checkpoint / "config.json", *_weight_files(checkpoint)]
    stamp = [[f.name, *_stat(f)] for f in files]
    memo = cache_dir() / "digests" / (hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:24] + ".json")
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if known["files"] == stamp:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    _write_atomic(memo, json.dumps({"files": stamp, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


def _weight_files(checkpoint: Path) -> list[Path]:
    """The distinct safetensors files of a checkpoint (its index's, or the single file), in name order."""
    index = checkpoint / INDEX_FILE
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        return [checkpoint / name for name in sorted(names)]
    return [checkpoint / SINGLE_FILE]


def _stat(path: Path) -> list[int]:
    try:
        info = path.stat()
    except OSError:
        raise CheckpointError(f"{path}: missing") from None
    return [info.st_size, info.st_mtime_ns]


def _write_atomic(path: Path, text: str) -> None:
    """Best effort: a memo that cannot be written only costs the next run a rehash."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
