"""The ASR prompt the model was trained on, and the parser of what it writes back.

The prompt is the official chat template rendered for one audio clip; the
parser turns `language English<asr_text>Hello.` into ("English", "Hello.") with the official
repetition clean-up first. Both follow qwen-asr 0.0.6 exactly; the tests check them
against it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qasr.errors import UsageError
from qasr.runtime.tokenizer import Tokenizer

AUDIO_PAD = "<|audio_pad|>"
ASR_TEXT = "<asr_text>"
_LANGUAGE_PREFIX = "language "
_MAX_PATTERN = 20  # longest repeated substring the repetition fix looks for


def normalize_language(name: str) -> str:
    """'cHINese ' -> 'Chinese': the canonical form the model writes and the prompt expects."""
    name = str(name).strip()
    if not name:
        raise UsageError("language is empty")
    return name[:1].upper() + name[1:].lower()


def check_language(name: str, supported: Sequence[str]) -> str:
    """The canonical name of `name`, or a UsageError when the model cannot be forced to it."""
    canonical = normalize_language(name)
    if canonical not in supported:
        raise UsageError(f"unsupported language {name.strip()!r}; supported: {', '.join(supported)}")
    return canonical


def asr_prompt(context: str, language: str | None) -> str:
    """The official chat prompt: system turn with the context (always present), one audio slot,
    the generation prompt, and `language X<asr_text>` when a (canonical) language is forced.
    """
    context = context or ""
    if AUDIO_PAD in context:
        # The official processor would expand this one instead of the real slot and fail.
        raise UsageError(f"context must not contain the audio placeholder token {AUDIO_PAD}")
    prompt = (
        f"<|im_start|>system\n{context}<|im_end|>\n"
        f"<|im_start|>user\n<|audio_start|>{AUDIO_PAD}<|audio_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    if language:
        prompt += f"{_LANGUAGE_PREFIX}{language}{ASR_TEXT}"
    return prompt


def prompt_ids(tokenizer: Tokenizer, context: str, language: str | None, audio_tokens: int) -> list[int]:
    """Token ids of `asr_prompt` with its audio slot widened to `audio_tokens` pad ids.

    The official processor repeats the placeholder string and then tokenizes; special tokens are
    atomic, so repeating the id after tokenizing gives the same ids.
    """
    ids = tokenizer.encode(asr_prompt(context, language))
    return expand_audio(ids, tokenizer.token_id(AUDIO_PAD), audio_tokens)


def expand_audio(ids: list[int], pad_id: int, audio_tokens: int) -> list[int]:
    """Replace the one `pad_id` in `ids` by `audio_tokens` copies (the decoder fills them with audio rows)."""
    if ids.count(pad_id) != 1:
        raise UsageError(f"prompt has {ids.count(pad_id)} audio placeholders, expected exactly 1")
    if audio_tokens < 1:
        raise UsageError(f"audio gives {audio_tokens} audio tokens; at least 1 is needed")
    at = ids.index(pad_id)
    return ids[:at] + [pad_id] * audio_tokens + ids[at + 1:]


def parse_output(raw: str, language: str | None) -> tuple[str, str]:
    """(language, text) from the decoded output, as the official `parse_asr_output`.

    A forced language is returned as given with the whole output as text (the prompt already holds
    the metadata). Otherwise the text follows the first `<asr_text>`; "language None" means no
    speech, reported as language "".
    """
    text = (raw or "").strip()
    if not text:
        return "", ""
    text = fix_repetitions(text)
    if language:
        return language, text
    if ASR_TEXT not in text:
        return "", text.strip()
    meta, text = text.split(ASR_TEXT, 1)
    if "language none" in meta.lower():
        return "", text.strip()
    return _meta_language(meta), text.strip()


def partial_text(raw: str, forced: bool) -> str | None:
    """The transcript part of output still being generated, cut where `parse_output` will cut it:
    all of it with a forced language, what follows `<asr_text>` once that came, the whole output
    once it can no longer be metadata; None while it still may be (text to hold back)."""
    if forced:
        return raw.lstrip()
    if ASR_TEXT in raw:
        return raw.split(ASR_TEXT, 1)[1].lstrip()
    return None if may_be_metadata(raw) else raw.lstrip()


def may_be_metadata(raw: str) -> bool:
    """Whether output so far could still be the metadata `parse_output` cuts off (`language X`, its
    lines, up to `<asr_text>`): a streamer holds text back only while this is true."""
    head = raw.lstrip().lower()
    return ASR_TEXT not in raw and (head.startswith(_LANGUAGE_PREFIX) or _LANGUAGE_PREFIX.startswith(head))


def _meta_language(meta: str) -> str:
    """The normalised name from the first metadata line that starts with `language `."""
    for line in meta.splitlines():
        line = line.strip()
        if line.lower().startswith(_LANGUAGE_PREFIX):
            name = line[len(_LANGUAGE_PREFIX):].strip()
            return normalize_language(name) if name else ""
    return ""


def fix_repetitions(text: str, threshold: int = 20) -> str:
    """The official `detect_and_fix_repetitions`, in linear-ish time.

    Runs of more than `threshold` identical characters become one character. Then, left to right,
    the first substring of 1..20 characters repeated at least `threshold` times in a row (shortest
    period first at the leftmost position) is kept once and the scan goes on after the repeats.
    As in the official code, a repeat only counts when it starts at least 2 * threshold characters
    before the end. One regex search per repeat replaces the official per-position loops and its
    recursion (which also fails past ~1000 repeats).
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    text = re.sub(r"(.)\1{%d,}" % threshold, r"\1", text, flags=re.DOTALL)
    repeat = re.compile(r"(.{1,%d}?)\1{%d,}" % (_MAX_PATTERN, threshold - 1), flags=re.DOTALL)
    last_start = len(text) - 2 * threshold
    kept, pos = [], 0
    while (found := repeat.search(text, pos)) and found.start() <= last_start:
        kept.append(text[pos:found.end(1)])
        pos = found.end()
    kept.append(text[pos:])
    return "".join(kept)


def merge_languages(languages: list[str]) -> str:
    """Per-chunk languages as one comma list, empties and consecutive duplicates dropped."""
    merged: list[str] = []
    for name in languages:
        name = (name or "").strip()
        if name and (not merged or merged[-1] != name):
            merged.append(name)
    return ",".join(merged)
