"""The random-checkpoint generator writes exactly the official on-disk layout."""

from __future__ import annotations

import json

import pytest

from qasr.models.config import load_config
from qasr.models.synthetic import make_checkpoint
from qasr.models.synthetic_tokenizer import ADDED_TOKENS, BASE_VOCAB_SIZE
from qasr.runtime.tokenizer import Tokenizer

OFFICIAL_FILES = {"config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
                  "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json"}


def test_layout(checkpoint):
    path = checkpoint("tiny")
    assert {p.name for p in path.iterdir()} == OFFICIAL_FILES
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "qwen3_asr" and raw["transformers_version"] == "4.57.6"
    assert set(raw["thinker_config"]) >= {"audio_config", "text_config", "audio_token_id"}
    assert len(json.loads((path / "vocab.json").read_text())) == BASE_VOCAB_SIZE


def test_special_tokens_carry_their_real_ids(checkpoint):
    from transformers import AutoTokenizer

    path = checkpoint("tiny")
    hf = AutoTokenizer.from_pretrained(str(path))
    ours = Tokenizer.from_dir(path)
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|audio_start|>": 151669, "<|audio_end|>": 151670, "<non_speech>": 151675,
                "<|audio_pad|>": 151676, "<asr_text>": 151704, "<timestamp>": 151705}
    for token, token_id in expected.items():
        assert hf.convert_tokens_to_ids(token) == token_id == ours.token_id(token)
    assert len(ADDED_TOKENS) == 63 and hf.convert_ids_to_tokens(151705) == "<timestamp>"


def test_prompt_words_are_tokenized_not_hard_coded(checkpoint):
    from oracle import load_official

    official = load_official(checkpoint("tiny"))
    prompt = official._build_text_prompt(context="", force_language="English")
    assert prompt == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|audio_start|><|audio_pad|>"
                      "<|audio_end|><|im_end|>\n<|im_start|>assistant\nlanguage English<asr_text>")
    ours = Tokenizer.from_dir(checkpoint("tiny"))
    ids = ours.encode(prompt)
    assert ids == official.processor.tokenizer(prompt)["input_ids"]
    assert ids[:3] == [151644, ours.encode("system")[0], ours.encode("\n")[0]]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, checkpoint):
    again = make_checkpoint(tmp_path / "again", "tiny", seed=0)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)
    first = (checkpoint("tiny") / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == first
    assert (other / "model.safetensors").read_bytes() != first


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied", "tiny-mqa", "tiny-aligner"])
def test_every_test_shape_parses(checkpoint, preset):
    config = load_config(checkpoint(preset))
    assert config.is_aligner == (preset == "tiny-aligner")
