"""The runtime tokenizer: the official ids with the standard Qwen2 rules, and whole-character streaming."""

from __future__ import annotations

import random

import pytest

from qasr.errors import BundleError
from qasr.runtime.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = ["今天天气很好。你好，世界！", "Grüße aus Köln — naïve café", "日本語のテキスト🎉 and 한국어", "McDonald's iPhone 2026"]


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_dir(checkpoint("tiny"))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers_with_the_qwen2_rules(checkpoint, tokenizer, text):
    from transformers import AutoTokenizer

    from qasr.runtime.tokenizer import qwen2_pre_tokenizer

    official = AutoTokenizer.from_pretrained(str(checkpoint("tiny")))
    official.backend_tokenizer.pre_tokenizer = qwen2_pre_tokenizer()
    assert tokenizer.encode(text) == official(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids) or text.isascii()  # bytes are split
    stream = IncrementalDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_of_random_ids_equals_the_full_decode(tokenizer):
    """Invalid bytes (a random model writes them) come out as the full decode shows them."""
    draw = random.Random(7)
    ids = [draw.randrange(151936) for _ in range(300)] + [151645, 151704, 151669, 2000, 151705]
    draw.shuffle(ids)
    stream = IncrementalDecoder(tokenizer)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(BundleError, match="vocab.json: missing"):
        Tokenizer.from_dir(tmp_path)


def test_saved_file_writes_merges_as_strings_and_loads_the_same_tokenizer(checkpoint, tokenizer, tmp_path):
    """The bundle's tokenizer.json: merges in the hub's "a b" form (half the parse's peak for the
    real vocabulary), unescaped UTF-8, and the same ids, special tokens and decodes as the source."""
    import json

    tokenizer.save(tmp_path / "tokenizer.json")
    raw = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    merges = json.loads(raw)["model"]["merges"]
    source = [line for line in (checkpoint("tiny") / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    assert merges == source and "Ġ" in raw and "\\u0120" not in raw
    saved = Tokenizer.from_dir(tmp_path)
    prompt = "<|im_start|>system\nJetson TensorRT<|im_end|>\n<|im_start|>assistant\nlanguage English<asr_text>"
    for text in [*TEXTS, prompt]:
        assert saved.encode(text) == tokenizer.encode(text)
    ids = list(range(0, 151936, 97)) + [151645, 151704, 151669]
    assert saved.decode(ids) == tokenizer.decode(ids)
    assert saved.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids, skip_special_tokens=False)
