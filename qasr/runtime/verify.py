"""`qasr verify`: a bundle of any precision, on any backend, against the fp32 graphs, on the user's audio.

Four stages, each judged against limits that depend on the precision under test:
- audio: the audio embeddings (encoder + projector) against the reference's: relative error, cosine;
- decoder: teacher-forced along the reference's greedy ids, fed the reference's embeddings (so the
  decoder's own error shows apart from the encoder's): logit cosine per step, top-1 agreement;
- ids: the bundle's own free-running greedy ids against the reference's: agreement, first divergence;
- text: character error rate between the two transcripts;
- truth (when the true transcripts are given): each run's CER against them, and how much the
  bundle's exceeds the fp32 reference's.
The reference runs on ONNX Runtime on the CPU, the fp32 path that tier-2 parity checks against
torch. A bundle verified against itself is exact (ONNX Runtime on the CPU is deterministic).
Random-weight checkpoints have flat logits, so their figures are pessimistic for quantized weights.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from qasr.errors import UsageError
from qasr.runtime.audio import SAMPLE_RATE, load_audio, source_path
from qasr.runtime.batch import greedy_decode
from qasr.runtime.decode import Decoded, token_budget
from qasr.runtime.prompt import parse_output, prompt_ids
from qasr.runtime.resolve import export_reference
from qasr.runtime.transcribe import MAX_SECONDS, Transcriber

# Lossier last; a stage is judged by the lossiest format among its graphs and the engines running them.
ORDER = ("fp32", "fp16", "bf16", "int8", "int4")


@dataclass(frozen=True)
class Limits:
    """Pass limits per precision: embeddings' relative error (max) and cosine (min), the decoder's
    mean logit cosine and teacher-forced top-1 agreement, free-running id agreement, CER, and how
    far the CER against true transcripts may rise over fp32's (the goals of docs/demo-model.md)."""

    embed_rel: float
    embed_cosine: float
    logit_cosine: float
    top1: float
    ids: float
    cer: float
    truth_rise: float


# fp32 elsewhere (CUDA, TensorRT fp32): summation order only. bf16/fp16: the derived graphs of
# docs/tensorrt.md (fp32 islands), checked by tests/test_gpu.py.
# int8/int4: see docs/benchmarks.md ("Quantized weights"); measured on random weights, pessimistic.
LIMITS = {
    "fp32": Limits(1e-3, 0.9999, 0.9999, 0.99, 0.95, 0.05, 0.005),
    "fp16": Limits(0.05, 0.999, 0.99, 0.99, 0.8, 0.1, 0.01),
    "bf16": Limits(0.05, 0.999, 0.99, 0.99, 0.8, 0.1, 0.01),
    "int8": Limits(0.05, 0.999, 0.99, 0.95, 0.7, 0.1, 0.005),
    "int4": Limits(0.25, 0.97, 0.95, 0.8, 0.5, 0.25, 0.02),
}


@dataclass
class Clip:
    audio: str
    embed_rel: float
    embed_cosine: float
    logit_cosines: list[float]
    top1: list[bool]
    ids: tuple[list[int], list[int]]  # (reference, bundle)
    texts: tuple[str, str]  # (reference, bundle)
    truth: str | None = None  # the true transcript, when given

    @property
    def first_divergence(self) -> int | None:
        ref, got = self.ids
        return next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b),
                    None if len(ref) == len(got) else min(len(ref), len(got)))


@dataclass
class Report:
    bundle: str
    reference: str
    backend: str
    precision: dict[str, str]  # stage -> the precision its limits come from
    clips: list[Clip] = field(default_factory=list)

    def figures(self) -> dict[str, dict]:
        cosines = [c for clip in self.clips for c in clip.logit_cosines]
        top1 = [t for clip in self.clips for t in clip.top1]
        edits = sum(edit_distance(*clip.texts[::-1]) for clip in self.clips)
        chars = sum(len(clip.texts[0]) for clip in self.clips)
        return {
            "audio": {"rel_error": max(c.embed_rel for c in self.clips),
                      "cosine": min(c.embed_cosine for c in self.clips)},
            "decoder": {"logit_cosine_mean": float(np.mean(cosines)), "logit_cosine_min": min(cosines),
                        "top1": float(np.mean(top1)), "steps": len(top1)},
            "ids": {"agreement": min(id_agreement(*c.ids) for c in self.clips),
                    "first_divergence": {c.audio: c.first_divergence for c in self.clips}},
            "text": {"cer": edits / chars if chars else float(edits > 0)},
            **({"truth": self._truth_figures()} if self.has_truth else {}),
        }

    @property
    def has_truth(self) -> bool:
        return bool(self.clips) and all(c.truth is not None for c in self.clips)

    def _truth_figures(self) -> dict[str, float]:
        """CER of the bundle and of the fp32 reference against the true transcripts, over all clips."""
        bundle = corpus_cer((c.texts[1], c.truth or "") for c in self.clips)
        reference = corpus_cer((c.texts[0], c.truth or "") for c in self.clips)
        return {"cer": bundle, "reference_cer": reference, "rise": bundle - reference}

    def shortfall(self) -> str | None:
        """One line naming the first stage outside its limits, or None when all are within them."""
        f = self.figures()
        checks = [
            ("audio", "embedding relative error", f["audio"]["rel_error"], "<=", "embed_rel"),
            ("audio", "embedding cosine", f["audio"]["cosine"], ">=", "embed_cosine"),
            ("decoder", "mean logit cosine", f["decoder"]["logit_cosine_mean"], ">=", "logit_cosine"),
            ("decoder", "top-1 agreement", f["decoder"]["top1"], ">=", "top1"),
            ("ids", "free-running id agreement", f["ids"]["agreement"], ">=", "ids"),
            ("text", "character error rate", f["text"]["cer"], "<=", "cer"),
        ]
        if "truth" in f:
            checks.append(("text", "CER rise over fp32 against the true text", f["truth"]["rise"], "<=", "truth_rise"))
        for stage, what, value, op, key in checks:
            limit = getattr(LIMITS[self.precision[stage]], key)
            if (value > limit) if op == "<=" else (value < limit):
                return (f"{stage}: {what} {value:.4g} is outside the {self.precision[stage]} limit "
                        f"({op} {limit:g})")
        return None

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "reference": self.reference, "backend": self.backend,
                "precision": self.precision, "figures": self.figures(),
                "limits": {stage: vars(LIMITS[p]) for stage, p in self.precision.items()},
                "clips": [{"audio": c.audio, "embed_rel": c.embed_rel, "embed_cosine": c.embed_cosine,
                           "logit_cosines": c.logit_cosines, "top1": sum(c.top1) / len(c.top1),
                           "first_divergence": c.first_divergence, "reference_text": c.texts[0],
                           "text": c.texts[1], "truth": c.truth} for c in self.clips],
                "shortfall": self.shortfall()}

    def to_text(self) -> str:
        f = self.figures()
        p = self.precision
        divergence = ", ".join(f"{Path(a).name}: {'none' if d is None else f'step {d}'}"
                               for a, d in f["ids"]["first_divergence"].items())
        lines = [
            f"{self.bundle} on {self.backend} against {self.reference}, {len(self.clips)} clip(s)",
            f"  audio    ({p['audio']})  embeddings rel. error {f['audio']['rel_error']:.3g}, "
            f"cosine {f['audio']['cosine']:.6f}",
            f"  decoder  ({p['decoder']})  logit cosine mean {f['decoder']['logit_cosine_mean']:.6f}, "
            f"min {f['decoder']['logit_cosine_min']:.6f}; top-1 agreement {f['decoder']['top1']:.1%} "
            f"over {f['decoder']['steps']} teacher-forced steps",
            f"  ids      ({p['ids']})  agreement {f['ids']['agreement']:.1%}; first divergence {divergence}",
            f"  text     ({p['text']})  CER {f['text']['cer']:.2%}",
        ]
        if "truth" in f:
            lines.append(f"  truth    ({p['text']})  CER {f['truth']['cer']:.2%} against the given text "
                         f"(fp32 reference {f['truth']['reference_cer']:.2%})")
        shortfall = self.shortfall()
        lines.append(f"  result   {'within the limits' if shortfall is None else 'FELL SHORT: ' + shortfall}")
        return "\n".join(lines) + "\n"


def verify(bundle: str, audios: list, reference: str | None = None, backend: str = "auto",
           threads: int | None = None, max_new_tokens: int | None = None, precision: str = "auto",
           texts: list[str] | None = None) -> Report:
    """Run `bundle` (on `backend`, at `precision` on a GPU) and its fp32 reference (ONNX Runtime, CPU) on
    every clip; `texts`: the clips' true transcripts, in order, for CER against them."""
    if texts is not None and len(texts) != len(audios):
        raise UsageError(f"{len(texts)} reference text(s) for {len(audios)} audio file(s); give one per audio")
    model = Transcriber.load(bundle, backend=backend, threads=threads, precision=precision)
    ref_path = reference or model.bundle.manifest.get("reference")
    if not ref_path:
        raise UsageError(f"{model.bundle.path}: records no fp32 bundle it came from; give --reference "
                         "BUNDLE_OR_CHECKPOINT")
    with tempfile.TemporaryDirectory(prefix="qasr-verify-") as tmp:  # a checkpoint reference's export
        ref = Transcriber.load(_reference_bundle(ref_path, Path(tmp)), backend="onnxruntime", threads=threads)
        if ref.bundle.manifest["source"]["sha256"] != model.bundle.manifest["source"]["sha256"]:
            raise UsageError(f"{ref.bundle.path}: exported from another checkpoint than {model.bundle.path}")
        report = Report(str(model.bundle.path), str(ref_path), model.backend.name, stage_precisions(model))
        truths: list[str | None] = list(texts) if texts is not None else [None] * len(audios)
        for audio, truth in zip(audios, truths):
            report.clips.append(replace(_verify_clip(model, ref, audio, max_new_tokens), truth=truth))
    return report


def _reference_bundle(path: str, scratch: Path) -> str:
    """A bundle as is; a checkpoint directory exported to an fp32 bundle in `scratch` first (needs the
    export extra)."""
    if not (Path(path) / "config.json").is_file() or (Path(path) / "manifest.json").is_file():
        return path
    return str(export_reference(Path(path), scratch / "fp32"))


def stage_precisions(model: Transcriber) -> dict[str, str]:
    """The precision each stage is judged at: its graphs' weights, or the engines' type if lossier."""
    weights = {name: f"int{entry['bits']}" for name, entry in model.bundle.manifest.get("weights", {}).items()}
    record = getattr(model.backend, "record", {})  # TensorRT engines: their precision and weights
    engines = str(record.get("precision") or getattr(model.backend, "precision", "fp32"))  # or ORT CUDA's graphs

    def lossiest(*kinds: str) -> str:
        return max(kinds, key=ORDER.index)

    audio = lossiest(weights.get("encoder", "fp32"), weights.get("projector", "fp32"), engines)
    decoder = lossiest(weights.get("decoder", "fp32"), engines, record.get("weights", "fp32"))
    both = lossiest(audio, decoder)
    return {"audio": audio, "decoder": decoder, "ids": both, "text": both}


def _verify_clip(model: Transcriber, ref: Transcriber, audio, max_new_tokens: int | None) -> Clip:
    name = source_path(audio) or "<audio>"
    wave = load_audio(audio)
    if len(wave) > MAX_SECONDS * SAMPLE_RATE:
        raise UsageError(f"{name}: verify takes clips of at most {MAX_SECONDS // 60} minutes")
    budget = token_budget(len(wave) / SAMPLE_RATE)
    budget = min(budget, max_new_tokens) if max_new_tokens else budget
    ref_embeds, embeds = ref.encode(wave, SAMPLE_RATE), model.encode(wave, SAMPLE_RATE)
    expected = _decode(ref, ref_embeds, budget, keep_logits=True)
    forced = expected.tokens + ([ref.eos_ids[0]] if expected.stopped else [])
    taught = _decode(model, ref_embeds, budget, keep_logits=True, forced=forced)
    free = _decode(model, embeds, budget)
    return Clip(
        audio=name, embed_rel=relative_error(embeds, ref_embeds), embed_cosine=cosine(embeds, ref_embeds),
        logit_cosines=[cosine(a, b) for a, b in zip(taught.logits, expected.logits)],
        top1=[int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(taught.logits, expected.logits)],
        ids=(expected.tokens, free.tokens),
        texts=(_text(ref, expected), _text(model, free)),
    )


def _decode(model: Transcriber, embeds: np.ndarray, budget: int, keep_logits: bool = False,
            forced: list[int] | None = None) -> Decoded:
    prompt = prompt_ids(model.tokenizer, "", None, len(embeds))
    return greedy_decode(model.backend, prompt, embeds, model.audio_token, budget, model.eos_ids,
                         keep_logits=keep_logits, forced=forced)


def _text(model: Transcriber, decoded: Decoded) -> str:
    return parse_output(model.tokenizer.decode(decoded.tokens), None)[1]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else float(np.array_equal(a, b))


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||, over the whole array."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale else float(np.linalg.norm(a))


def id_agreement(ref: list[int], got: list[int]) -> float:
    """Positions where the two id sequences agree, over the longer one (1.0 for two empty ones)."""
    longest = max(len(ref), len(got))
    return sum(a == b for a, b in zip(ref, got)) / longest if longest else 1.0


def normalize_text(text: str) -> str:
    """Text as CER compares it: lowercase, punctuation dropped, spaces collapsed, and no spaces
    between CJK characters (Chinese is written without them; a model may put some in)."""
    text = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return re.sub(r"(?<=[\u3400-\u9fff]) (?=[\u3400-\u9fff])", "", text)


def text_errors(hypothesis: str, reference: str) -> tuple[int, int]:
    """(character edits, reference characters) between two texts after `normalize_text`."""
    hypothesis, reference = normalize_text(hypothesis), normalize_text(reference)
    return edit_distance(hypothesis, reference), len(reference)


def corpus_cer(pairs: Iterable[tuple[str, str]]) -> float:
    """CER over all (hypothesis, reference) pairs together: their edits over their reference
    characters, after `normalize_text`, so that short clips weigh by their length."""
    counts = [text_errors(hypothesis, reference) for hypothesis, reference in pairs]
    edits, chars = sum(e for e, _ in counts), sum(n for _, n in counts)
    return edits / chars if chars else float(edits > 0)


def edit_distance(hypothesis: str, reference: str) -> int:
    """Levenshtein distance in characters (the numerator of CER)."""
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        current = [i]
        for j, h in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]
