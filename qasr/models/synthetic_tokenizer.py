"""Tokenizer files for random checkpoints: a small byte-level BPE with the real special tokens.

No real vocabulary can be downloaded here, so tests get a genuine byte-level BPE trained on a
small multilingual text with the Qwen2 pre-tokenizer rules, padded to the real base size (151,643
entries) so that the 63 added tokens land on their real ids (151643-151705). The padding entries
are byte strings that are never valid UTF-8 and that no merge produces: a random model can still
emit them, which exercises the decoder's handling of broken byte sequences.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qasr.runtime.tokenizer import bytes_to_unicode, qwen2_pre_tokenizer

BASE_VOCAB_SIZE = 151643

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
          "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
_AUDIO = ["<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
          "<tts_text_bos_single>"]

# (content, special) for ids 151643.. in order; <non_speech>, <asr_text> and <timestamp> are not
# special, so decode(skip_special_tokens=True) keeps them, which the output parser relies on.
ADDED_TOKENS: list[tuple[str, bool]] = (
    [(t, True) for t in _SPECIAL] + [(t, False) for t in _PLAIN] + [(t, True) for t in _AUDIO]
    + [("<non_speech>", False), ("<|audio_pad|>", True)]
    + [(f"<blank{i}>", True) for i in range(1, 28)]
    + [("<asr_text>", False), ("<timestamp>", False)]
)

CORPUS = """\
language English<asr_text>Today we release the speech recognition model for thirty languages.
The quick brown fox jumps over the lazy dog. It's a well-known sentence; we've used it often.
Numbers like 2026, 3.14 and 1,000,000 appear in meetings, phone calls and lectures.
language Chinese<asr_text>今天我们发布语音识别模型，支持三十种语言和二十二种方言。
交易停滞，市场观望。我们在北京和上海测试了这个系统。
language German<asr_text>Heute veröffentlichen wir ein Spracherkennungsmodell für dreißig Sprachen.
language French<asr_text>Aujourd'hui, nous publions un modèle de reconnaissance vocale.
language Spanish<asr_text>Hoy publicamos un modelo de reconocimiento de voz para treinta idiomas.
language Japanese<asr_text>今日は音声認識モデルを公開します。ありがとうございます。
language Korean<asr_text>오늘 우리는 음성 인식 모델을 공개합니다. 감사합니다.
language Russian<asr_text>Сегодня мы выпускаем модель распознавания речи.
language Cantonese<asr_text>我哋今日發佈語音識別模型。
language Arabic<asr_text>اليوم نطلق نموذج التعرف على الكلام.
language Portuguese Italian Dutch Swedish Danish Finnish Polish Czech Filipino Persian Greek
language Romanian Hungarian Macedonian Indonesian Thai Vietnamese Turkish Hindi Malay None
system user assistant McDonald iPhone OpenAI Jetson TensorRT ONNX Runtime Qwen3-ASR
"""


def _byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    return tok


def _filler_tokens(count: int) -> list[str]:
    """Vocabulary padding: 0xF8 (never valid UTF-8) plus three index bytes, in byte-level form."""
    byte_char = bytes_to_unicode()
    return ["".join(byte_char[b] for b in bytes([0xF8]) + i.to_bytes(3, "big")) for i in range(count)]


def train_vocab(merges_wanted: int = 3000) -> tuple[dict[str, int], list[str], int]:
    """Train the small BPE on CORPUS and pad its vocabulary to BASE_VOCAB_SIZE entries.

    Returns the vocabulary, the merges and how many entries are real tokens (the rest padding).
    """
    tok = _byte_level_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges_wanted, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(state["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    real = len(vocab)
    for filler in _filler_tokens(BASE_VOCAB_SIZE - real):
        vocab[filler] = len(vocab)
    return vocab, merges, real


def write_tokenizer_files(out_dir: Path) -> int:
    """vocab.json, merges.txt, tokenizer_config.json and chat_template.json in the official layout.

    Returns the number of real (trained) tokens at the start of the vocabulary.
    """
    vocab, merges, real = train_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False),
                                                   encoding="utf-8")
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2),
                                                encoding="utf-8")
    return real


def tokenizer_config() -> dict:
    added = {
        str(BASE_VOCAB_SIZE + i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": special}
        for i, (content, special) in enumerate(ADDED_TOKENS)
    }
    audio = {"audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>", "audio_token": "<|audio_pad|>"}
    vision = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": _SPECIAL[1:] + ["<|audio_start|>", "<|audio_end|>", "<tts_pad>",
                                                     "<tts_text_bos>", "<tts_text_bos_single>", "<|audio_pad|>"],
        **audio, "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "extra_special_tokens": {**audio, **vision}, **vision,
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "processor_class": "Qwen3ASRProcessor",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


# The system turn is always written (empty when there is no context) and carries every system
# text; a user turn carries only its audio placeholders.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- if m['content'] is string -%}{%- set ns.system = ns.system + m['content'] -%}"
    "{%- else -%}{%- for part in m['content'] if part['type'] == 'text' -%}"
    "{%- set ns.system = ns.system + part['text'] -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['content'] is string -%}{%- if m['role'] == 'assistant' -%}{{- m['content'] -}}{%- endif -%}"
    "{%- else -%}{%- for part in m['content'] if part['type'] == 'audio' -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
