"""The Qwen2 byte-level BPE tokenizer, over the `tokenizers` library.

Built from the checkpoint's vocab.json, merges.txt and tokenizer_config.json with the standard
Qwen2 split rules, which the model was trained with. (The official package, loading a local
directory with transformers 4.57, swaps in Mistral's split regex; that changes ids of mixed-case
words in context text, so this tokenizer deliberately does not follow it.)
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from qasr.errors import BundleError

TOKENIZER_FILE = "tokenizer.json"
SOURCE_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split with the Qwen2 regex, then map bytes to printable characters (no prefix space)."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class Tokenizer:
    """encode/decode with the model's special tokens at their real ids."""

    def __init__(self, backend: _Backend):
        self.backend = backend
        self.added = backend.get_added_tokens_decoder()
        self.byte_of = {ch: b for b, ch in bytes_to_unicode().items()}

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load tokenizer.json if present, else build from vocab.json + merges.txt + tokenizer_config.json."""
        directory = Path(directory)
        single = directory / TOKENIZER_FILE
        if single.is_file():
            try:
                return cls(_Backend.from_file(str(single)))
            except Exception as exc:  # the library raises plain Exception for a malformed file
                raise BundleError(f"{single}: not a valid tokenizer file ({exc})") from None
        return cls(build_backend(directory))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json with each merge as one "a b" string, UTF-8 unescaped, not indented.

        That is the form of the hub's own files, which `tokenizers` still reads; its own writer
        makes each merge a two-string list, and loading the real 151,387 merges so peaks 60 MB
        higher (+127 MB against +64 MB for the parse, 50 MB against 42 MB resident after it).
        Byte-level tokens hold no space (it is written as Ġ), so the string form is unambiguous."""
        data = json.loads(self.backend.to_str())
        merges = data["model"].get("merges") or []
        if all(isinstance(m, list) and not any(" " in part for part in m) for m in merges):
            data["model"]["merges"] = [" ".join(m) for m in merges]
        Path(path).write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings inside it map to their single ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Non-special added tokens such as <asr_text> are kept, as the parser needs."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `decode` makes of one id: none for special tokens and unknown ids."""
        added = self.added.get(token_id)
        if added is not None:
            return b"" if added.special else added.content.encode()
        token = self.backend.id_to_token(token_id)
        return b"" if token is None else bytes(self.byte_of[ch] for ch in token)

    def token_id(self, token: str) -> int:
        found = self.backend.token_to_id(token)
        if found is None:
            raise BundleError(f"tokenizer has no token {token!r}")
        return found


class IncrementalDecoder:
    """Text of a growing id sequence, released in whole characters only.

    Byte-level BPE splits a character's UTF-8 bytes across tokens (a CJK character is often
    three), so decoding each new token alone would print halves as U+FFFD. Here each token adds
    its bytes to an incremental UTF-8 decoder, which holds a partial character back until it
    completes; the concatenated pieces equal a full `decode` of the same ids, invalid bytes
    (which a model can write) included.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        return self.utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of the sequence: a character left partial becomes U+FFFD, as in a full decode."""
        return self.utf8.decode(b"", final=True)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE tokens are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def build_backend(directory: Path) -> _Backend:
    """Assemble the BPE from the official source files; added tokens must land on their listed ids."""
    for name in SOURCE_FILES:
        if not (directory / name).is_file():
            raise BundleError(f"{directory / name}: missing (needed to build the tokenizer)")
    try:
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        merges = _read_merges(directory / "merges.txt")
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        added = sorted((int(i), entry) for i, entry in config["added_tokens_decoder"].items())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError) as exc:
        raise BundleError(f"{directory}: tokenizer files are not valid ({exc})") from None
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = qwen2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    for token_id, entry in added:
        token = AddedToken(entry["content"], special=bool(entry.get("special")), normalized=False,
                           lstrip=False, rstrip=False, single_word=False)
        if entry.get("special"):
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(entry["content"]) != token_id:
            raise BundleError(
                f"{directory / 'tokenizer_config.json'}: added token {entry['content']!r} should have id "
                f"{token_id} but lands on {backend.token_to_id(entry['content'])} (vocab.json size mismatch?)"
            )
    return backend


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"{path.name} has a line that is not one merge pair")
    return [(a, b) for a, b in pairs]
