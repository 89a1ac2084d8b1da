"""A bundle: the exported directory of graphs, tokenizer files and manifest.json.

The manifest is the runtime's only source of model facts (dimensions, token ids, languages,
graph contracts), so the runtime never needs the checkpoint, torch or transformers. Every file
the manifest names is checked on load, and a bundle written by another format version is
refused with one line that says how to re-export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qasr.errors import BundleError
from qasr.jsonfile import read_json, read_record

MANIFEST = "manifest.json"
FORMAT = "qasr-bundle"
FORMAT_VERSION = 2  # 2: the decoder shares one cache across batch rows (cache_start)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A staging directory beside `out`, moved into its place only when the block completes, so a
    failed or interrupted write never leaves a half directory or damages the one already there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp)
        yield staging
        staging.chmod(0o755)  # TemporaryDirectory makes it private; the result is an ordinary directory
        _sync(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        staging.mkdir()  # TemporaryDirectory removes its (now empty) directory on exit


def _sync(folder: Path) -> None:
    """Flush the folder's files to disk before it is moved into place. Otherwise a power cut soon after
    (a Jetson unplugged) can leave the new name over files the disk never received; and the pages
    of files still being written back stay in a process that maps them (qasr.memory.drop_file_pages)."""
    for path in [folder, *folder.rglob("*")]:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:  # a directory where the system cannot open one (Windows): its files still are
            continue
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


AUDIO_GRAPHS = ("encoder", "projector")  # the graphs that turn audio into embeddings (--encoder-weights, release)


# Folders that later steps add inside a bundle, each with a record written last (so a folder
# without its record is unfinished work: qasr.jsonfile.read_record).
DERIVED, DERIVED_RECORD = "derived", "graphs.json"  # graphs in another precision (qasr.export.precision)
ENGINES, ENGINES_RECORD = "engines", "engines.json"  # TensorRT engines (`qasr build`)
PREPACKED, PREPACKED_RECORD = "prepacked", "prepacked.json"  # CPU-packed weights (qasr.runtime.backends.prepack)


def derived_dir(bundle: Bundle, precision: str) -> Path:
    return bundle.path / DERIVED / precision


def derived_is_current(bundle: Bundle, precision: str) -> bool:
    """True when BUNDLE/derived/<precision> was derived from this bundle's checkpoint."""
    record = read_record(derived_dir(bundle, precision) / DERIVED_RECORD) or {}
    return record.get("source_sha256") == bundle.manifest["source"]["sha256"]


def cache_names(layers: int) -> list[str]:
    """The decoder's per-layer KV-cache inputs, in order: past_key_0, past_value_0, past_key_1, ..."""
    return [f"past_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            hint = " (a checkpoint? run `qasr export` on it first)" if (path / "config.json").is_file() else ""
            raise BundleError(f"{path}: no {MANIFEST}, not a qasr bundle{hint}")
        manifest = read_json(file, BundleError)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{file}: bundle format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
                f"{FORMAT} v{FORMAT_VERSION}; re-export it with this qasr (`qasr export CHECKPOINT --out DIR`)"
            )
        bundle = cls(path, manifest)
        for name in manifest["graphs"]:
            bundle.graph_path(name)
        return bundle

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def languages(self) -> list[str]:
        return list(self.manifest["languages"])

    @property
    def tokens(self) -> dict[str, int | list[int]]:
        return self.manifest["tokens"]

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def fused_decoder(self) -> bool:
        """Whether the decoder is the fused graph (docs/graphs.md, "decoder (fused)"): one cache
        slot per batch row, ONNX Runtime's ops; the ONNX Runtime backends run it, TensorRT does not."""
        return self.manifest["graphs"].get("decoder", {}).get("layout") == "slots"

    def graph_path(self, name: str) -> Path:
        """Path of graph `name`, checked to exist together with its external weights."""
        entry = self.manifest["graphs"].get(name)
        if entry is None:
            raise BundleError(f"{self.path}: this {self.kind} bundle has no {name} graph")
        for path in [self.path / entry["file"], *self.data_paths(name)]:
            if not path.is_file():
                raise BundleError(f"{path}: missing (named in {MANIFEST})")
        return self.path / entry["file"]

    def data_paths(self, name: str) -> list[Path]:
        """The external weight files of graph `name`, as its manifest entry lists them."""
        return [self.path / file for file in self.manifest["graphs"][name].get("data", [])]
