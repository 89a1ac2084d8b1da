"""Forced-aligner text side: the units it times, its input string, and the repair of its output.

The aligner times "units": words for space-separated languages, single ideographs for Chinese,
nagisa words for Japanese and soynlp words for Korean, with everything but letters, digits and
the apostrophe removed. After each unit come two `<timestamp>` slots whose
predicted classes x 80 ms are its start and end; the sequence is repaired into a non-decreasing
one. All of it follows qwen-asr 0.0.6 `Qwen3ForceAlignProcessor` exactly.
"""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import numpy as np

from qasr.errors import QasrError, UsageError
from qasr.runtime.prompt import AUDIO_PAD, expand_audio
from qasr.runtime.results import Word
from qasr.runtime.tokenizer import Tokenizer

TIMESTAMP = "<timestamp>"
AUDIO_SLOT = f"<|audio_start|>{AUDIO_PAD}<|audio_end|>"
_CJK_RANGES = (  # the official ranges: unified ideographs, extensions A-E, compatibility ideographs
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF),
)
_KOREAN_DICT = "korean_dict_jieba.dict"


def _is_kept(ch: str) -> bool:
    """Letters, digits and the apostrophe are what the aligner times; the rest is dropped."""
    return ch == "'" or unicodedata.category(ch)[0] in "LN"


def _clean(token: str) -> str:
    """The token without punctuation and symbols: "U.S." -> "US", "well-known" -> "wellknown"."""
    return "".join(ch for ch in token if _is_kept(ch))


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def split_units(text: str, language: str) -> list[str]:
    """The units the aligner times in `text`, as the official `encode_timestamp` word list."""
    language = (language or "").lower()
    if language == "japanese":
        words = _japanese_words(text)
    elif language == "korean":
        words = _korean_tokenizer().tokenize(text)
    else:
        return [unit for word in text.split() for unit in _split_ideographs(_clean(word))]
    return [unit for unit in map(_clean, words) if unit]


def _split_ideographs(word: str) -> list[str]:
    """Each CJK ideograph on its own; runs of anything else stay whole."""
    units: list[str] = []
    run = ""
    for ch in word:
        if _is_cjk(ch):
            units += [run, ch] if run else [ch]
            run = ""
        else:
            run += ch
    return units + [run] if run else units


def _japanese_words(text: str) -> list[str]:
    """nagisa's words (it also normalises width: "Ｑｗｅｎ" -> "Qwen"); imported only when needed."""
    try:
        import nagisa
    except ImportError:
        raise UsageError('Japanese word timestamps need nagisa: pip install "qwen3-asr-edge[ja]"') from None
    return nagisa.tagging(text).words


@lru_cache(maxsize=1)
def _korean_tokenizer():
    """soynlp's LTokenizer with every word of the official Korean dictionary scored 1.0."""
    try:
        from soynlp.tokenizer import LTokenizer
    except ImportError:
        raise UsageError('Korean word timestamps need soynlp: pip install "qwen3-asr-edge[ko]"') from None
    path = resources.files("qasr.runtime") / "assets" / _KOREAN_DICT
    try:
        lines = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QasrError(f"{path}: cannot read the Korean dictionary shipped with qasr ({exc}); reinstall it") from None
    return LTokenizer(scores={line.split()[0]: 1.0 for line in lines.splitlines() if line.strip()})


def aligner_text(units: list[str]) -> str:
    """The aligner's input: the audio slot, then each unit followed by its start and end slots."""
    slots = TIMESTAMP * 2
    return AUDIO_SLOT + slots.join(units) + slots


def aligner_ids(tokenizer: Tokenizer, units: list[str], audio_tokens: int) -> list[int]:
    """Token ids of `aligner_text` with the audio slot widened to `audio_tokens` pad ids."""
    ids = tokenizer.encode(aligner_text(units))
    return expand_audio(ids, tokenizer.token_id(AUDIO_PAD), audio_tokens)


def repair_timestamps(values: Sequence[float]) -> list[int]:
    """The official `fix_timestamp`: keep a longest non-decreasing subsequence, mend the rest.

    A gap of one or two values takes the nearer kept neighbour (the left one on a tie); a longer
    gap is interpolated linearly between its neighbours; a gap at either end copies the one
    neighbour it has. Values are then truncated to int, as the official code does.
    """
    values = [float(v) for v in values]
    kept = _longest_non_decreasing(values)
    fixed = list(values)
    n, i = len(values), 0
    while i < n:
        if kept[i]:
            i += 1
            continue
        j = i
        while j < n and not kept[j]:
            j += 1
        # The neighbours are kept values (runs are maximal); a run at either end has one, and
        # using it for both sides gives exactly the official copy of that one neighbour.
        left = values[i - 1] if i > 0 else values[j]
        right = values[j] if j < n else left
        for k in range(i, j):
            fixed[k] = _mend(k, i, j, left, right)
        i = j
    return [int(v) for v in fixed]


def _mend(k: int, i: int, j: int, left: float, right: float) -> float:
    """The repaired value at k inside the anomalous run [i, j), between kept neighbours."""
    if j - i <= 2:
        return left if k - (i - 1) <= j - k else right
    return left + (right - left) / (j - i + 1) * (k - i + 1)


def _longest_non_decreasing(values: list[float]) -> list[bool]:
    """Membership mask of the official LIS: O(n log n) with its exact tie-breaking.

    The official O(n^2) DP gives each i the earliest predecessor j among those with the longest
    chain ending at values[j] <= values[i], and backtracks from the earliest longest end. A
    Fenwick tree over value ranks holding max (length, -index) answers the same question.
    """
    ranks = sorted(set(values))
    tree = [(0, 0)] * (len(ranks) + 1)
    parent = [-1] * len(values)
    best = (0, 0)
    for i, v in enumerate(values):
        rank = bisect.bisect_right(ranks, v)  # 1-based rank of v; prefix [1, rank] is values <= v
        length, neg_j, r = 0, 0, rank
        while r > 0:
            length, neg_j = max((length, neg_j), tree[r])
            r -= r & -r
        parent[i] = -neg_j if length else -1
        entry = (length + 1, -i)
        best = max(best, entry)
        while rank < len(tree):
            tree[rank] = max(tree[rank], entry)
            rank += rank & -rank
    kept = [False] * len(values)
    i = -best[1] if values else -1
    while i != -1:
        kept[i] = True
        i = parent[i]
    return kept


def unit_times(units: list[str], class_ids: Sequence[int], segment_ms: float, offset: float = 0.0) -> list[Word]:
    """Words with times in seconds from the aligner's class ids at the 2K slots.

    class x segment_ms (computed in float32, as the official torch code) -> repair -> seconds
    rounded to 3 decimals; `offset` (a chunk's start) is added and rounded again, as the
    official chunk merge does.
    """
    if not units:
        return []
    if len(class_ids) != 2 * len(units):
        raise UsageError(f"aligner gave {len(class_ids)} timestamp slots for {len(units)} units (expected 2 each)")
    ms = (np.asarray(class_ids, dtype=np.float32) * np.float32(segment_ms)).tolist()
    fixed = repair_timestamps(ms)
    words = []
    for m, unit in enumerate(units):
        start, end = round(fixed[2 * m] / 1000.0, 3), round(fixed[2 * m + 1] / 1000.0, 3)
        words.append(Word(unit, round(start + offset, 3), round(end + offset, 3)))
    return words


def unit_spans(text: str, units: list[str]) -> list[tuple[int, int]]:
    """(start, end) character offsets of each unit in `text`, in order: units back onto their text.

    Units are the text's kept characters with the rest dropped, so they are matched against the
    text's kept characters; both sides are compared in NFKD form without marks, because nagisa
    normalises Japanese (full-width letters, half-width kana). A unit that cannot be found gets an
    empty span where the previous one ended.
    """
    kept, owner = _comparable(text)
    spans, searched_to, cursor = [], 0, 0
    for unit in units:
        needle = _comparable(unit)[0]
        at = kept.find(needle, searched_to) if needle else -1
        if at < 0:
            spans.append((cursor, cursor))
            continue
        searched_to = at + len(needle)
        cursor = owner[searched_to - 1] + 1
        spans.append((owner[at], cursor))
    return spans


def _comparable(text: str) -> tuple[str, list[int]]:
    """The kept characters of `text` decomposed (NFKD) with their marks dropped, and the offset in
    `text` each came from. (A unit of marks only, such as a lone half-width voiced mark, is then
    empty and gets an empty span.)
    """
    chars, owner = [], []
    for i, ch in enumerate(text):
        if _is_kept(ch):
            base = [c for c in unicodedata.normalize("NFKD", ch) if _is_kept(c)]
            chars += base
            owner += [i] * len(base)
    return "".join(chars), owner
