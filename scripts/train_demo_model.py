"""Train the demo Qwen3-ASR (models/qwen3-asr-demo) on speech synthesized here, in under an hour on 2 cores.

    nice python scripts/train_demo_model.py --out .bench/demo-2000 --work .bench/demo-train
    nice python scripts/train_demo_model.py --out .bench/demo-4000 --work .bench/demo-train \
        --resume .bench/demo-2000 --lr 1e-3
    nice python scripts/train_demo_model.py --out models/qwen3-asr-demo --work .bench/demo-train \
        --resume .bench/demo-4000 --lr 1e-3 --quiet 0.6 --pairs 0.15

The committed model is these three runs: 2000 steps from random weights, then 2000 more from that
checkpoint with a fresh warm-up and cosine at half the peak rate (--resume), which took the
held-out CER from 13.6 % to 3.5 %, then 2000 more on batches with seconds of quiet around the
clips (--quiet) and two sentences in a row (--pairs), so that a sentence with a microphone's
margins is transcribed as the sentence (docs/demo-model.md).

1. Word lists: 40 English words (Debian wamerican) and 40 Mandarin two-character words
   (jieba's dictionary), written beside the checkpoint with the voice settings.
2. Speech: 4000 random 2-4 word sentences, spoken by espeak-ng with several voices, speeds and pitches,
   rate-changed and noised by sox (qasr.models.demo_data); log-mel features as the runtime makes them.
   With --quiet and --pairs, a share of batches gets quiet margins or two sentences with a pause,
   made from the synthesized wavs as each batch is drawn (augmented_batch).
3. Model: the project's reference model (qasr.models.thinker.Thinker) in a small configuration of
   the official architecture: AuT encoder (conv stem, 1 s chunks, 8 s windows), projector, Qwen3
   decoder with a tied head. Its tokenizer is a byte-level BPE trained on the sentences, with the
   official special tokens at their official ids, so the official package's prompt and stop ids
   work unchanged. The embedding has the official 151,936 rows; the rows of ids the tokenizer
   never makes stay zero. Training computes logits only for the real rows and stands for all the
   zero rows with one logit of log(count), which is exactly the softmax over the full vocabulary.
   A CTC loss on the audio embeddings (against the tied table) helps the decoder find the audio.
4. Saved in the official layout (config.json with thinker_config, bf16 thinker.* safetensors, the
   tokenizer files); the last step reloads it with Thinker.from_pretrained and reports held-out CER.

Everything is seeded; synthesis and training are deterministic on one machine. Needs espeak-ng,
sox and wamerican (apt) and jieba (pip, the `demo` extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import pre_tokenizers, trainers
from torch.nn import functional as F

from qasr.kernels.fbank import log_mel
from qasr.models import demo_data
from qasr.models.checkpoint import DECODER_PREFIX, ENCODER_PREFIX, load_weights
from qasr.models.config import parse_config
from qasr.models.synthetic import PREPROCESSOR, Preset, official_config
from qasr.models.synthetic_tokenizer import ADDED_TOKENS, BASE_VOCAB_SIZE, CHAT_TEMPLATE, _byte_level_tokenizer, \
    tokenizer_config
from qasr.models.thinker import Thinker
from qasr.runtime.audio import load_audio
from qasr.runtime.prompt import parse_output, prompt_ids
from qasr.runtime.tokenizer import Tokenizer
from qasr.runtime.verify import text_errors
from qasr.runtime.windows import split_windows, token_count

PRESET = Preset(
    aligner=False,
    audio=dict(d_model=128, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=384,
               downsample_hidden_size=16, output_dim=32),
    text=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              intermediate_size=128),
    tie=True, languages=("Chinese", "English"),
)
CTC_WEIGHT = 0.5
ROPE_THETA = 10000
EOS, PAD = "<|im_end|>", "<|endoftext|>"
MAX_SECONDS = 14.0  # longest augmented clip: two encoder windows
LONG_QUIET = 0.3  # share of quiet batches with a long tail (a microphone left open after the sentence)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/qwen3-asr-demo")
    p.add_argument("--work", default=".bench/demo-train", help="synthesized audio and features (ignored by git)")
    p.add_argument("--words", type=int, default=40, help="words per language")
    p.add_argument("--sentence-words", type=int, nargs=2, default=(2, 4), help="fewest and most words a sentence")
    p.add_argument("--utterances", type=int, default=4000, help="training sentences, half per language")
    p.add_argument("--held-out", type=int, default=40, help="validation sentences (held-out voice and speed)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--jobs", type=int, default=2, help="synthesis processes")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--resume", help="start from this saved demo checkpoint (same words and seed) instead of "
                                    "random weights; --steps more steps, with a fresh warm-up and cosine")
    p.add_argument("--quiet", type=float, default=0.0,
                   help="share of batches whose clips get seconds of quiet before and after (a microphone's margins)")
    p.add_argument("--pairs", type=float, default=0.0,
                   help="share of batches whose clips are two sentences of one language with a pause between")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- data ------------------------------------------------------------------------------------

def make_sentences(words: dict[str, list[str]], count: int, held_out: int, seed: int, sizes: tuple[int, int]):
    """(training, held-out) lists of (lang, text, Voice); held-out sentences never occur in training."""
    rng = random.Random(seed)
    settings = demo_data.SETTINGS
    seen: set[str] = set()
    held: list = []
    for i in range(held_out):
        lang = ("en", "zh")[i % 2]
        text = demo_data.sentence(words[lang], lang, rng, *sizes)
        seen.add(text)
        held.append((lang, text, settings.held_out(lang, rng.choice(settings.pitches))))
    train: list = []
    while len(train) < count:
        lang = ("en", "zh")[len(train) % 2]
        text = demo_data.sentence(words[lang], lang, rng, *sizes)
        if text not in seen:
            train.append((lang, text, settings.draw(lang, rng)))
    return train, held


def _features(job: tuple[int, str, demo_data.Voice, str]) -> np.ndarray:
    index, text, voice, work = job
    wav = demo_data.synthesize(text, voice, Path(work) / f"{index:05d}.wav")
    return log_mel(load_audio(wav)).astype(np.float16)


def synthesize_all(items, work: Path, name: str, threads: int) -> list[np.ndarray]:
    """log-mel features of every item, cached in work/name.npz."""
    cache = work / f"{name}.npz"
    if cache.is_file():
        data = np.load(cache)
        return [data[f"a{i}"] for i in range(len(items))]
    (work / name).mkdir(parents=True, exist_ok=True)
    jobs = [(i, text, voice, str(work / name)) for i, (_, text, voice) in enumerate(items)]
    with ProcessPoolExecutor(threads) as pool:
        feats = list(pool.map(_features, jobs, chunksize=32))
    np.savez(cache, **{f"a{i}": f for i, f in enumerate(feats)})
    return feats


def augmented_batch(batch, train, train_feats, folder: Path, by_lang, quiet: float, pairs: float,
                    rng: random.Random):
    """(items, log-mel features) of one batch; a `pairs` share of batches as two sentences, a `quiet`
    share with quiet margins, the rest as synthesized.

    espeak-ng trims its output, so a plain clip has at most about 0.4 s of quiet at either end; a
    model trained on those alone wrote nonsense for a sentence with a second of silence around it
    (docs/demo-model.md). Margins are 0-2 s either side, or (LONG_QUIET) 0-3 s before and 2-6 s
    after, of zeros or of white noise of rms 1e-4 to 3e-3; pairs are joined by a 0.2-1 s pause and
    get short margins. One kind a batch keeps the clips of a batch of similar length.
    """
    kind = rng.random() if quiet + pairs else 1.0  # runs without them draw what they always drew
    if kind >= quiet + pairs:
        return [train[i] for i in batch], [train_feats[i] for i in batch]
    long = kind >= pairs and rng.random() < LONG_QUIET
    items, feats = [], []
    for i in batch:
        lang, text, voice = train[i]
        noise = 0.0 if rng.random() < 0.5 else 10 ** rng.uniform(-4, -2.5)
        speech = load_audio(folder / f"{i:05d}.wav")
        if kind < pairs:
            j = rng.choice(by_lang[lang])
            speech = np.concatenate([demo_data.with_quiet(speech, 0, rng.uniform(0.2, 1.0), noise, rng.randrange(2**32)),
                                     load_audio(folder / f"{j:05d}.wav")])
            text = demo_data.join([text, train[j][1]], lang)
        before, after = (rng.uniform(0, 3), rng.uniform(2, 6)) if long else (rng.uniform(0, 2), rng.uniform(0, 2))
        after = max(0.0, min(after, MAX_SECONDS - before - len(speech) / 16000))
        speech = demo_data.with_quiet(speech, before, after, noise, rng.randrange(2**32))
        items.append((lang, text, voice))
        feats.append(log_mel(speech))
    return items, feats


def quiet_features(items, folder: Path, before: float, after: float) -> list[np.ndarray]:
    """log-mel features of synthesized clips with seconds of zeros before and after (a held-out check)."""
    return [log_mel(demo_data.with_quiet(load_audio(folder / f"{i:05d}.wav"), before, after))
            for i in range(len(items))]


# ---- tokenizer -------------------------------------------------------------------------------

def write_tokenizer(out: Path, corpus: list[str], merges_wanted: int = 400) -> tuple[Tokenizer, int]:
    """Byte-level BPE trained on the targets, special tokens at their official ids (151643-151705).

    400 merges make every word of the lists one token; more would merge neighbouring Mandarin
    words (a Mandarin sentence is one piece for the Qwen2 split rules) into tokens of their own.

    The ids between the trained tokens and the special ones are filled with the shortest printable
    ASCII strings that are not trained tokens: no merge makes them, so no text encodes to them,
    and the vocabulary has no holes (the tokenizers library warns at length about holes whenever
    it serializes one, which both the official package and `qasr export` do). Two- and
    three-character keys keep vocab.json near 2 MB, against 3 MB for the byte strings that
    qasr.models.synthetic_tokenizer pads with. Returns the tokenizer and its count of trained tokens.
    """
    tok = _byte_level_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=256 + merges_wanted, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(state["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    trained = len(vocab)
    fillers = _fillers(set(vocab))
    while len(vocab) < BASE_VOCAB_SIZE:
        vocab[next(fillers)] = len(vocab)
    vocab.update({content: BASE_VOCAB_SIZE + i for i, (content, _) in enumerate(ADDED_TOKENS)})
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False),
                                               encoding="utf-8")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2),
                                            encoding="utf-8")
    return Tokenizer.from_dir(out), trained


def _fillers(taken: set[str]):
    """Two-, then three-character strings of printable ASCII (no quote or backslash) not in `taken`."""
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1) if chr(c) not in "\"\\"]
    for length in (2, 3):
        for chars in itertools.product(alphabet, repeat=length):
            if (text := "".join(chars)) not in taken:
                yield text


# ---- model -----------------------------------------------------------------------------------

class Compact:
    """The map between official ids and the rows training keeps (trained tokens, then special tokens)."""

    def __init__(self, trained: int, vocab_size: int):
        self.ids = torch.tensor(list(range(trained)) + [BASE_VOCAB_SIZE + i for i in range(len(ADDED_TOKENS))])
        self.row = torch.full((vocab_size,), -1, dtype=torch.long)
        self.row[self.ids] = torch.arange(len(self.ids))
        self.zero_logit = math.log(vocab_size - len(self.ids))  # all zero rows, as one class

    def __len__(self) -> int:
        return len(self.ids)


def build_model(full_config, compact: Compact, seed: int) -> Thinker:
    """The reference Thinker with the embedding cut to the kept rows (ids remapped by Compact)."""
    torch.manual_seed(seed)
    text = replace(full_config.text, vocab_size=len(compact))
    config = replace(full_config, text=text, audio_token_id=int(compact.row[full_config.audio_token_id]))
    model = Thinker(config)
    with torch.no_grad():
        model.decoder.embed_tokens.weight.normal_(0, text.hidden_size ** -0.5)
    return model


def resume(model: Thinker, compact: Compact, full_config, checkpoint: Path, out: Path) -> None:
    """Load a checkpoint this script saved, its embedding cut back to the kept rows.

    Only a checkpoint trained on the same tokenizer fits the compact rows, so its vocab.json must
    equal the one just written (same words, sentences and seed).
    """
    if (checkpoint / "vocab.json").read_bytes() != (out / "vocab.json").read_bytes():
        raise SystemExit(f"{checkpoint} was trained with another tokenizer; resume needs the same words and seed")
    tensors = load_weights(checkpoint, full_config)
    name = DECODER_PREFIX + "embed_tokens.weight"
    tensors[name] = tensors[name][compact.ids]
    model.load_official(tensors)


def batch_tensors(items, feats, tokenizer: Tokenizer, compact: Compact, pad_id: int, window: int,
                  augment: random.Random | None):
    """Encoder windows, compact decoder ids and labels for one batch (labels -100 off the target).

    A clip longer than the encoder's 8 s window is cut into windows as the runtime cuts it
    (split_windows); `owner` says which clip each window belongs to.
    """
    clips = []
    for f in feats:
        mel = torch.from_numpy(f.astype(np.float32))
        if augment is not None:
            _spec_augment(mel, mel.shape[1], augment)
        clips.append(split_windows(mel.numpy(), window))
    frames = np.concatenate([w_frames for _, w_frames, _ in clips])
    owner = torch.tensor([b for b, (_, w_frames, _) in enumerate(clips) for _ in w_frames])
    width = int(max(-(-n // 100) for n in frames)) * 100
    mel = torch.from_numpy(np.concatenate([windows for windows, _, _ in clips])[:, :, :width])
    conv = torch.from_numpy(np.concatenate([np.minimum(c, width) for _, _, c in clips]))
    n_audio = [int(token_count(f.shape[1])) for f in feats]
    rows, labels = [], []
    for (lang, text, _), audio in zip(items, n_audio):
        prompt = prompt_ids(tokenizer, "", None, audio)
        answer = tokenizer.encode(demo_data.target(text, lang) + EOS)
        rows.append(prompt + answer)
        labels.append([-100] * (len(prompt) - 1) + answer + [-100])
    length = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (length - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (length - len(r)) for r in labels])
    lab = torch.where(lab >= 0, compact.row[lab.clamp(min=0)], lab)
    words = [compact.row[torch.tensor(tokenizer.encode(text))] for _, text, _ in items]
    ctc = (torch.cat(words), torch.tensor([len(w) for w in words]))
    return mel, torch.from_numpy(frames), conv, owner, torch.tensor(n_audio), compact.row[ids], lab, ctc


def _spec_augment(mel: torch.Tensor, frames: int, rng: random.Random) -> None:
    """Two frequency bands and two short time spans set to the clip's floor (-> robustness to unseen voices)."""
    floor = float(mel[:, :frames].min())
    for _ in range(2):
        width = rng.randint(0, 12)
        start = rng.randint(0, 128 - width)
        mel[start : start + width, :frames] = floor
        span = rng.randint(0, 8)
        at = rng.randint(0, max(0, frames - span))
        mel[:, at : at + span] = floor


def forward_loss(model: Thinker, compact: Compact, mel, frames, conv, owner, n_audio, ids, labels, words,
                 blank: int):
    """Cross-entropy of the answer ids, plus a CTC loss of the audio embeddings against the words.

    The CTC term scores each audio embedding against the tied embedding table (blank: a special
    token's row). It is a training aid only, with no weights of its own, so nothing of it is saved:
    it pulls the audio rows towards the embeddings of the words spoken there, which the decoder's
    attention then finds far sooner than from the cross-entropy alone (without it the loss sat at
    the no-audio level for the first 650 steps of a run).
    """
    hidden = model.projector(model.encoder(mel, frames, conv))  # [windows, tokens, H]
    pieces = [[] for _ in n_audio]
    for w, b in enumerate(owner.tolist()):
        pieces[b].append(hidden[w, : token_count(int(frames[w]))])
    audio = torch.nn.utils.rnn.pad_sequence([torch.cat(p) for p in pieces], batch_first=True)  # [B, tokens, H]
    x = model.decoder.embed(ids, audio)
    out, _ = model.decoder(x, torch.zeros(ids.shape[0], dtype=torch.long))
    table = model.decoder.embed_tokens.weight
    logits = F.linear(out, table)
    zero = torch.full(logits.shape[:-1] + (1,), compact.zero_logit)
    logits = torch.cat([logits, zero], dim=-1)
    answer = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    frame_logits = F.linear(model.decoder.norm(audio), table).log_softmax(-1).transpose(0, 1)
    targets, lengths = words
    ctc = F.ctc_loss(frame_logits, targets, n_audio, lengths, blank=blank, zero_infinity=True)
    return answer + CTC_WEIGHT * ctc, answer


# ---- saving and checking ---------------------------------------------------------------------

def save_checkpoint(model: Thinker, compact: Compact, raw_config: dict, out: Path) -> None:
    """thinker.* tensors in bf16 under their official names; the embedding scattered to its official ids."""
    tensors = {}
    for name, value in model.encoder.state_dict().items():
        tensors[ENCODER_PREFIX + name] = value
    for name, value in model.projector.state_dict().items():
        tensors[ENCODER_PREFIX + name] = value
    for name, value in model.decoder.state_dict().items():
        tensors[DECODER_PREFIX + name] = value
    full = torch.zeros(raw_config["thinker_config"]["text_config"]["vocab_size"], model.config.text.hidden_size)
    full[compact.ids] = model.decoder.embed_tokens.weight.detach()
    tensors[DECODER_PREFIX + "embed_tokens.weight"] = full
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw_config, indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "eos_token_id": [151643, 151645], "pad_token_id": 151643,
         "transformers_version": "4.57.6"}, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2), encoding="utf-8")


def held_out_cer(model_dir: Path, items, feats, limit: int | None = None) -> tuple[float, list[str]]:
    """CER of the saved checkpoint (reloaded as the reference model, greedy) on held-out items."""
    model = Thinker.from_pretrained(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    errors = chars = 0
    shown = []
    for (lang, text, _), feat in list(zip(items, feats))[:limit]:
        mel = feat.astype(np.float32)
        embeds = model.encode(mel)
        ids = prompt_ids(tokenizer, "", None, embeds.shape[0])
        run = model.generate(ids, embeds, 48)
        language, got = parse_output(tokenizer.decode(run.tokens), None)
        e, n = text_errors(got, text)
        errors, chars = errors + e + (language != demo_data.LANGUAGES[lang]) * n, chars + n
        shown.append(f"{lang} {language}: {got!r} <- {text!r}")
    return errors / max(chars, 1), shown


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    words = {"en": demo_data.english_words(args.words, args.seed), "zh": demo_data.mandarin_words(args.words)}
    for lang, ws in words.items():
        (out / f"words-{lang}.txt").write_text("\n".join(ws) + "\n", encoding="utf-8")
    (out / "voices.json").write_text(demo_data.SETTINGS.to_json(), encoding="utf-8")
    train, held = make_sentences(words, args.utterances, args.held_out, args.seed, tuple(args.sentence_words))
    log(f"synthesizing {len(train)} training and {len(held)} held-out utterances into {work}")
    train_feats = synthesize_all(train, work, "train", args.jobs)
    held_feats = synthesize_all(held, work, "held", args.jobs)
    held_quiet = quiet_features(held, work / "held", 1.0, 3.0) if args.quiet else None
    seconds = sum(f.shape[1] for f in train_feats) / 100
    log(f"synthesized: {seconds / 3600:.2f} h of training speech ({time.time() - started:.0f} s so far)")

    corpus = [demo_data.target(text, lang) for lang, text, _ in train] + ["system user assistant"]
    tokenizer, trained = write_tokenizer(out, corpus)
    raw_config = official_config(PRESET)
    # The release's theta of 1e6 leaves a 32-wide head almost no positional resolution over the
    # ~100 positions of a demo prompt; 1e4 gives the decoder's attention a clearer sense of order.
    raw_config["thinker_config"]["text_config"]["rope_theta"] = ROPE_THETA
    config = parse_config(raw_config)
    compact = Compact(trained, config.text.vocab_size)
    log(f"tokenizer: {len(compact)} kept ids of {config.text.vocab_size}")
    model = build_model(config, compact, args.seed)
    if args.resume:
        resume(model, compact, config, Path(args.resume), out)
        log(f"resumed from {args.resume}")
    pad_id = tokenizer.token_id(PAD)
    blank = int(compact.row[pad_id])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(300, args.steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(args.seed)
    order = sorted(range(len(train)), key=lambda i: train_feats[i].shape[1])
    batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    model.train()
    smoothed = None
    by_lang = {lang: [i for i, item in enumerate(train) if item[0] == lang] for lang in words}
    for step in range(args.steps):
        batch = batches[rng.randrange(len(batches))]
        items, feats = augmented_batch(batch, train, train_feats, work / "train", by_lang, args.quiet, args.pairs, rng)
        tensors = batch_tensors(items, feats, tokenizer, compact, pad_id, config.audio.window_frames, rng)
        loss, answer = forward_loss(model, compact, *tensors, blank=blank)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        smoothed = answer.item() if smoothed is None else 0.95 * smoothed + 0.05 * answer.item()
        if step % 50 == 0:
            log(f"step {step} answer loss {smoothed:.3f} (with CTC {loss.item():.3f}) lr {scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            save_checkpoint(model, compact, raw_config, out)
            limit = None if step + 1 == args.steps else 20
            cer, shown = held_out_cer(out, held, held_feats, limit)
            log(f"step {step + 1}: held-out CER {100 * cer:.2f} % on {limit or len(held)} utterances")
            for line in shown[:4]:
                log("  " + line)
            if held_quiet is not None:
                cer, shown = held_out_cer(out, held, held_quiet, limit)
                log(f"step {step + 1}: held-out CER {100 * cer:.2f} % with 1 s of zeros before, 3 s after")
                for line in shown[:2]:
                    log("  " + line)
            model.train()
    log(f"done in {(time.time() - started) / 60:.1f} min; checkpoint in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
