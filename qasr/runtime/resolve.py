"""Where a model comes from: a bundle, a checkpoint directory or a Hugging Face id, as a bundle path;
and the runtime's one seam up into qasr.export, for the work done on first use.

A bundle is used as it is. A checkpoint (a local directory, or a hub id that huggingface_hub
resolves through its own cache, `HF_HUB_OFFLINE`, tokens and `@revision`) is exported once into
qasr's cache and reused from there, as openai/whisper and faster-whisper prepare their default
models on first use. Cache entries are keyed by the checkpoint's content (the sha256 a bundle's
manifest records) and its weight precision: a changed checkpoint is exported again, an unchanged
one never is. A lock per entry lets two first uses at once export it once; the export itself is
staged and moved into place whole, and an entry that is damaged later is found and rebuilt.

The same holds for a bundle's fp16/bf16 graphs on the GPU (`derive_graphs`) and for the fp32
reference `qasr verify` exports from a checkpoint (`export_reference`). Those three are the only
places the runtime calls into qasr.export, each importing it when called: exporting needs the
`export` extra (torch, onnx), deriving the `gpu` extra (onnx), and a runtime-only install that
meets either says so in one line.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from qasr.cache import cache_dir, locked, writable_dir
from qasr.errors import BundleError, CheckpointError, EngineError, QasrError, UsageError, first_line
from qasr.jsonfile import read_record
from qasr.memory import available_memory, gb
from qasr.models.checkpoint import expected_shapes, parameter_counts
from qasr.models.config import ModelConfig, load_config
from qasr.models.digest import checkpoint_digest
from qasr.progress import Progress, say
from qasr.runtime.bundle import MANIFEST, Bundle, derived_dir, derived_is_current

DEFAULT_MODEL = "Qwen/Qwen3-ASR-0.6B"
DEFAULT_ALIGNER = "Qwen/Qwen3-ForcedAligner-0.6B"
ENTRY_RECORD = "qasr-cache.json"  # written last into a cache entry: its key and the size of every file
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer; no docs or media
EXPORT_HINT = ('pip install "qwen3-asr-edge[export]", or run `qasr export` on a machine that has it '
               "and copy the bundle here")


def resolve_model(spec: str | os.PathLike, kind: str = "asr", weights: str = "fp32",
                  progress: Progress = say, encoder_weights: str = "fp32", on_cpu: bool = False) -> Path:
    """The bundle directory for `spec`: a bundle itself, or the cached export of a checkpoint or hub id
    at `weights` (and `encoder_weights`).

    `kind` ("asr" or "aligner") is checked on a checkpoint's config before a minute is spent
    exporting the wrong model. `on_cpu`: the bundle will run on ONNX Runtime's CPU provider, so
    quantized weights take the fused decoder where the model has one (a decode step in 0.7-0.8x the
    traced graph's time in int4: docs/benchmarks.md, "Fused decoder on the CPU"); elsewhere the
    traced graph, which every backend binds.
    """
    path = Path(spec)
    if (path / MANIFEST).is_file():
        return path
    checkpoint = checkpoint_dir(str(spec))
    config = load_config(checkpoint)
    _check_kind(checkpoint, config, kind)
    fused = on_cpu and weights != "fp32" and config.fusable
    return cached_export(checkpoint, weights, progress, name=str(spec), encoder_weights=encoder_weights,
                         decoder="fused" if fused else "traced")


def checkpoint_dir(spec: str) -> Path:
    """A local checkpoint directory as is; a hub id (`owner/name[@revision]`) through huggingface_hub."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BundleError(f"{spec}: neither a qasr bundle ({MANIFEST}) nor a checkpoint (config.json)")
        return path
    if path.exists() or not HUB_ID.match(spec):
        raise CheckpointError(f"{spec}: no such bundle or checkpoint directory (nor a Hugging Face id like "
                              f"{DEFAULT_MODEL})")
    return hub_snapshot(spec)


def hub_snapshot(spec: str) -> Path:
    """The local snapshot of a hub repository, downloaded into huggingface_hub's cache if need be."""
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{spec}: a Hugging Face id; fetching and exporting it needs the export extra: "
                         f"{EXPORT_HINT}") from None
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision or None, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated, bad revision: the hub raises many types
        local = Path(repo.split("/")[0]).is_dir()  # `bundles/x` with a bundles/ here: a mistyped path
        where = "no such directory, nor a model the Hugging Face hub has" if local else "not found in the Hugging Face hub or its cache"
        raise CheckpointError(f"{spec}: {where} ({first_line(exc)})") from None



def _check_kind(checkpoint: Path, config: ModelConfig, kind: str) -> None:
    found = "aligner" if config.is_aligner else "asr"
    if found != kind:
        names = {"asr": "a speech recognition checkpoint", "aligner": "a forced-aligner checkpoint"}
        raise BundleError(f"{checkpoint}: {names[found]}, not {names[kind]}")


def cached_export(checkpoint: Path, weights: str = "fp32", progress: Progress = say, name: str | None = None,
                  encoder_weights: str = "fp32", decoder: str = "traced") -> Path:
    """The cache entry for `checkpoint` at `weights` (and `encoder_weights`) with the `decoder` graph,
    exported under its lock if missing or damaged.

    `name` is what the user called it (a hub id rather than its snapshot path), for the messages."""
    digest = checkpoint_digest(checkpoint)
    root = writable_dir(cache_dir() / "bundles", "the model cache")
    precision = weights if encoder_weights == "fp32" else f"{weights}-encoder-{encoder_weights}"
    precision += "-fused" if decoder == "fused" else ""
    entry = root / f"{digest[:16]}-{precision}"
    if _entry_problem(entry, digest, precision) is None:
        return entry
    with locked(root / f".{entry.name}.lock", progress, f"another process is preparing {entry.name}"):
        problem = _entry_problem(entry, digest, precision)  # the other process may have made it meanwhile
        if problem is None:
            return entry
        if problem != "missing":
            progress(f"the cached bundle {entry} is {problem}; exporting it again")
            shutil.rmtree(entry)
        _export_entry(checkpoint, entry, digest, (weights, encoder_weights, decoder), progress,
                      name or str(checkpoint))
    return entry


def _export_entry(checkpoint: Path, entry: Path, digest: str, weights: tuple[str, str, str], progress: Progress,
                  name: str) -> None:
    try:
        from qasr.export.onnx_export import export_bundle
    except ImportError:
        raise UsageError(f"{name}: a checkpoint, not a qasr bundle; exporting it needs the export extra: "
                         f"{EXPORT_HINT}") from None
    precision = entry.name.split("-", 1)[1]
    memory, disk = preflight(checkpoint, entry.parent, *weights[:2], name=name)
    progress(f"first use of {name}: exporting it to ONNX ({precision}) into {entry}; this takes minutes, once, "
             f"and needs about {gb(memory)} of memory and {gb(disk)} of disk")
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}.") as tmp:
        staged = export_bundle(checkpoint, Path(tmp) / "bundle", progress=progress, weights=weights[0],
                               encoder_weights=weights[1], decoder=weights[2])
        record = {"sha256": digest, "weights": precision, "files": _sizes(staged)}
        (staged / ENTRY_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
        staged.rename(entry)


def preflight(checkpoint: Path, out: Path, weights: str, encoder_weights: str, name: str,
              memory: int | None = None, disk: int | None = None) -> tuple[int, int]:
    """(memory, disk) that exporting `checkpoint` into `out` needs; refuses in one line when this
    machine clearly lacks them (`memory`/`disk`: what it has, read from the system when not given)."""
    need_memory, need_disk = export_needs(checkpoint, weights, encoder_weights)
    memory = available_memory() if memory is None else memory
    disk = shutil.disk_usage(out).free if disk is None else disk
    for what, need, have in (("memory", need_memory, memory), ("disk space", need_disk, disk)):
        if have < need:
            where = f" in {out}" if what == "disk space" else ""
            raise UsageError(f"{name}: exporting it needs about {gb(need)} of {what}{where}; this machine has "
                             f"{gb(have)} available (free some, or export it elsewhere and copy the bundle)")
    return need_memory, need_disk


BASE_MEMORY = 1 << 30  # Python, torch, ONNX, the traced structure and one block of rows, measured at 0.6-1.0 GB
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1 + 4 / 128, "int4": 0.5 + (4 + 0.5) / 128}  # scales (and zero points) per block


def export_needs(checkpoint: Path, weights: str = "fp32", encoder_weights: str = "fp32") -> tuple[int, int]:
    """(memory, disk) in bytes to export `checkpoint`, from its config alone.

    The export holds one block of rows at a time; quantizing holds one whole weight in fp32 (the
    head's transpose, the largest) with its packed form (docs/benchmarks.md, "Bounded export").
    """
    config = load_config(checkpoint)
    largest = max(math.prod(shape) for shape in expected_shapes(config).values()) * 4
    quantized = weights != "fp32" or encoder_weights != "fp32"
    memory = BASE_MEMORY + (largest * 3 // 2 if quantized else 0)
    counts = parameter_counts(config)
    audio = counts["encoder"] + counts["projector"]
    disk = audio * BYTES_PER_WEIGHT[encoder_weights] + (sum(counts.values()) - audio) * BYTES_PER_WEIGHT[weights]
    return int(memory), int(disk * 1.05)  # and the tokenizer, the graphs' structure


def _sizes(bundle: Path) -> dict[str, int]:
    return {p.relative_to(bundle).as_posix(): p.stat().st_size for p in sorted(bundle.rglob("*")) if p.is_file()
            and p.name != ENTRY_RECORD}


def _entry_problem(entry: Path, digest: str, weights: str) -> str | None:
    """None for a complete entry of this checkpoint and precision, else what is wrong with it."""
    if not entry.exists():
        return "missing"
    record = read_record(entry / ENTRY_RECORD)
    if record is None:
        return "incomplete (its record of the export is missing or unreadable)"
    try:
        Bundle.load(entry)  # also refuses a bundle of another format version, which is then re-exported
    except QasrError as exc:
        return f"unusable ({exc})"
    if record.get("sha256") != digest or record.get("weights") != weights:
        return "from another checkpoint"
    expected = record.get("files", {})
    sizes = _sizes(entry)
    damaged = sorted(name for name, size in expected.items() if sizes.get(name) != size)
    return f"damaged ({', '.join(damaged[:3])})" if damaged else None




def export_reference(checkpoint: Path, out: Path) -> Path:
    """An fp32 bundle of `checkpoint` in `out`, for `qasr verify` to compare against (not cached: a
    reference is needed once, and its 2-8 GB should not stay behind)."""
    try:
        from qasr.export.onnx_export import export_bundle
    except ImportError:
        raise UsageError(f"{checkpoint}: a checkpoint reference is exported first, which needs torch: "
                         'pip install "qwen3-asr-edge[export]" (or give an fp32 bundle)') from None
    return export_bundle(checkpoint, out, progress=lambda line: None)


def derive_graphs(bundle: Bundle, precision: str, progress: Progress) -> None:
    """Derive BUNDLE/derived/<precision> once, on first use on the GPU, as a checkpoint is exported
    on its first use: under a lock, staged, and kept for later runs.

    The derivation rewrites the fp32 graphs with onnx (the gpu extra installs it); where that is
    missing, or the bundle is read-only, one line says how to get the graphs."""
    if derived_is_current(bundle, precision):
        return
    try:
        from qasr.export.precision import derive_bundle
    except ImportError:
        raise EngineError(f"{bundle.path}: {precision} graphs are derived from the fp32 ones with onnx: "
                          'pip install "qwen3-asr-edge[gpu]", or derive them elsewhere with '
                          f"`qasr build {bundle.path} --precision {precision} --graphs-only`") from None
    out = derived_dir(bundle, precision)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with locked(out.parent / f".{precision}.lock", progress, f"another process is deriving {out}"):
            if not derived_is_current(bundle, precision):
                progress(f"first use of {precision} on the GPU: deriving its graphs into {out}; once")
                derive_bundle(bundle, precision, progress=lambda line: None)
    except PermissionError:
        raise EngineError(f"{bundle.path}: not writable, so its {precision} graphs cannot be derived here; "
                          f"run `qasr build {bundle.path} --precision {precision} --graphs-only` where it is") from None
