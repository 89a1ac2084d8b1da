"""A model ready to run: a bundle of one kind opened on one backend, with its tokenizer.

`Transcriber` (speech recognition) and `Aligner` (forced alignment) are both this, each with its
own pipeline on top; loading, the kind check and the languages are written here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, TypeVar

from qasr.errors import BundleError
from qasr.memory import trim_heap
from qasr.runtime.backends.interface import Backend
from qasr.runtime.backends.select import gpu_backend_usable, open_backend
from qasr.runtime.bundle import Bundle
from qasr.runtime.resolve import resolve_model
from qasr.runtime.tokenizer import Tokenizer


def load_tokenizer(bundle: Bundle) -> Tokenizer:
    """The bundle's tokenizer, with the heap its file's parse freed given back (qasr.memory.trim_heap),
    which would otherwise stay resident for the process's life."""
    tokenizer = Tokenizer.from_dir(bundle.path)
    trim_heap()
    return tokenizer


NAMES = {"asr": ("a speech recognition model", "a speech recognition bundle"),
         "aligner": ("a forced aligner", "a forced-aligner bundle")}
Loaded = TypeVar("Loaded", bound="LoadedModel")


class LoadedModel:
    kind: ClassVar[str]     # the bundle kind this class runs: "asr" or "aligner"
    default: ClassVar[str]  # the model `load()` takes when none is named

    def __init__(self, bundle: Bundle, backend: Backend, tokenizer: Tokenizer | None = None):
        self.check_kind(bundle)
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(bundle)
        self.window_frames = int(bundle.manifest["audio"]["window_frames"])

    @classmethod
    def load(cls: type[Loaded], model: str | Path | None = None, backend: str = "auto", threads: int | None = None,
             weights: str = "fp32", encoder_weights: str = "fp32", precision: str = "auto",
             background_load: bool = True) -> Loaded:
        """`model` is a bundle, a checkpoint directory or a Hugging Face id (`owner/name[@revision]`),
        by default the class's `default`; a checkpoint is exported to a bundle at `weights` (and
        `encoder_weights`) once, on first use, and cached, with the fused decoder where quantized
        weights will run on the CPU (resolve_model's `on_cpu`). `precision` is the GPU's compute type
        (auto, fp32, fp16, bf16; see open_backend). `background_load=False` loads the large graph (the
        decoder, the aligner's own) when first needed, after the audio is encoded, instead of while it
        is: later to the first token where cores are spare, but with `release_encoder` the audio
        encoder's weights and the decoder's are never held together (`qasr transcribe` of one file)."""
        on_cpu = weights != "fp32" and (backend == "onnxruntime" or (backend == "auto" and not gpu_backend_usable()))
        loaded = Bundle.load(resolve_model(model or cls.default, cls.kind, weights, encoder_weights=encoder_weights,
                                           on_cpu=on_cpu))
        cls.check_kind(loaded)
        # The tokenizer before the weights: its parse's transient (+64 MB, the real vocabulary's) then
        # falls on the smallest resident set instead of beside the decoder's packing in the background.
        tokenizer = load_tokenizer(loaded)
        return cls(loaded, open_backend(loaded, backend, threads, precision, background_load=background_load),
                   tokenizer)

    @classmethod
    def check_kind(cls, bundle: Bundle) -> None:
        if bundle.kind != cls.kind:
            raise BundleError(f"{bundle.path}: {NAMES[bundle.kind][1]}, not {NAMES[cls.kind][0]}")

    @property
    def languages(self) -> list[str]:
        return self.bundle.languages
