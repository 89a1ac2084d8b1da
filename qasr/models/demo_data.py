"""Synthetic speech for the demo model: word lists from installed packages, espeak-ng and sox.

The demo checkpoint (models/qwen3-asr-demo) is trained on sentences drawn from two small word
lists, spoken by espeak-ng with several voices, speeds and pitches, then changed in rate and
mixed with noise by sox. The same functions make its held-out test sentences, with a voice and a
speed the training never used, so anyone can check the model on speech it has not heard.
Nothing is fetched from the network: the English words come from Debian's `wamerican` list, the
Mandarin words from the dictionary shipped inside the `jieba` wheel.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qasr.errors import first_line
from qasr.runtime.audio import load_audio

ENGLISH_DICT = Path("/usr/share/dict/american-english")
DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "qwen3-asr-demo"  # in a checkout of this repository
LANGUAGES = {"en": "English", "zh": "Chinese"}
NOISES = ("whitenoise", "pinknoise", "brownnoise")


@dataclass(frozen=True)
class Voice:
    """One espeak-ng rendering: voice (with variant), words per minute, pitch 0-99, sox speed factor,
    noise colour and level (0 = none)."""

    name: str
    speed: int
    pitch: int
    rate: float = 1.0
    noise: str = "whitenoise"
    noise_level: float = 0.0


@dataclass(frozen=True)
class VoiceSettings:
    """The grid training samples from, and the held-out settings tests use."""

    voices: dict[str, list[str]]
    speeds: list[int]
    pitches: list[int]
    rates: list[float]
    noise_levels: list[float]
    held_out_voices: dict[str, str]
    held_out_speed: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> VoiceSettings:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def draw(self, lang: str, rng: random.Random) -> Voice:
        """A random training rendering for `lang`."""
        return Voice(rng.choice(self.voices[lang]), rng.choice(self.speeds), rng.choice(self.pitches),
                     rng.choice(self.rates), rng.choice(NOISES), rng.choice(self.noise_levels))

    def held_out(self, lang: str, pitch: int = 50) -> Voice:
        """The voice and speed training never used, clean, at normal rate."""
        return Voice(self.held_out_voices[lang], self.held_out_speed, pitch)


SETTINGS = VoiceSettings(
    voices={"en": ["en-us+m1", "en-us+f2", "en-gb+m3", "en-us+f4", "en-gb-x-rp+m7"],
            "zh": ["cmn+m1", "cmn+f2", "cmn+m3", "cmn+f4", "cmn+m7"]},
    speeds=[135, 160, 185],
    pitches=[30, 45, 60, 75],
    rates=[0.92, 1.0, 1.08],
    noise_levels=[0.0, 0.003, 0.01],
    held_out_voices={"en": "en-us+m5", "zh": "cmn+f5"},
    held_out_speed=150,
)


def english_words(count: int, seed: int) -> list[str]:
    """`count` plain lowercase words of 3-6 letters from the installed wamerican list."""
    if not ENGLISH_DICT.is_file():
        raise FileNotFoundError(f"{ENGLISH_DICT}: missing (apt-get install wamerican)")
    words = sorted({w for w in ENGLISH_DICT.read_text(encoding="utf-8").split() if re.fullmatch(r"[a-z]{3,6}", w)})
    return sorted(random.Random(seed).sample(words, count))


def mandarin_words(count: int) -> list[str]:
    """The `count` most frequent two-character words of jieba's dictionary (package data)."""
    import jieba  # only the training script needs it; the word list it makes is committed

    entries = []
    for line in (Path(jieba.__file__).parent / "dict.txt").read_text(encoding="utf-8").splitlines():
        word, freq, _tag = line.split(" ")
        if re.fullmatch(r"[\u4e00-\u9fff]{2}", word):
            entries.append((-int(freq), word))
    return [w for _, w in sorted(entries)[:count]]


def sentence(words: list[str], lang: str, rng: random.Random, low: int = 2, high: int = 4) -> str:
    """low..high random words: space-separated English, unspaced Mandarin."""
    return join([rng.choice(words) for _ in range(rng.randint(low, high))], lang)


def join(parts: list[str], lang: str) -> str:
    """Words or sentences as one text: space-separated English, unspaced Mandarin."""
    return ("" if lang == "zh" else " ").join(parts)


def with_quiet(speech: np.ndarray, before: float, after: float, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """16 kHz `speech` with `before` and `after` seconds of quiet around it: zeros, or white noise
    of rms `noise` (seeded). A microphone hears such margins around every sentence."""
    rng = np.random.default_rng(seed)
    quiet = [(rng.standard_normal(round(16000 * s)) * noise).astype(np.float32) for s in (before, after)]
    return np.concatenate([quiet[0], speech.astype(np.float32), quiet[1]])


def target(text: str, lang: str) -> str:
    """The model's output for `text`, in the official format."""
    return f"language {LANGUAGES[lang]}<asr_text>{text}"


def synthesize(text: str, voice: Voice, out: str | Path) -> Path:
    """Speak `text` into a 16 kHz mono 16-bit wav: espeak-ng, then sox for rate, noise and resampling."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool}: not installed (apt-get install espeak-ng sox)")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch),
                        "-w", str(raw), text], check=True, capture_output=True)
        effects = ["rate", "16000", "speed", str(voice.rate)] if voice.rate != 1.0 else ["rate", "16000"]
        inputs = ["-v", "0.9", str(raw)]
        if voice.noise_level > 0:
            seconds = _wav_seconds(raw) + 0.1
            noise = (f"|sox -R -n -r 22050 -c 1 -b 16 -p synth {seconds:.2f} {voice.noise} "
                     f"vol {voice.noise_level}")
            inputs = ["-m", *inputs, "-v", "1", noise]
        subprocess.run(["sox", "-R", *inputs, "-c", "1", "-b", "16", str(out), *effects, "trim", "0",
                        f"{_wav_seconds(raw) / voice.rate:.3f}"], check=True, capture_output=True)
    return out


def _wav_seconds(path: Path) -> float:
    """Duration of a PCM wav from its header (espeak-ng writes 16-bit mono)."""
    header = path.read_bytes()[:44]
    rate = int.from_bytes(header[24:28], "little")
    return (path.stat().st_size - 44) / (2 * rate)


def speak(text: str, voice: Voice) -> np.ndarray:
    """`synthesize` into memory: float32 samples at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_audio(synthesize(text, voice, Path(tmp) / "speech.wav"))


def held_out_clips(model_dir: str | Path, folder: str | Path, count: int, seed: int) -> list[tuple[str, str, str]]:
    """[(wav path, language, text)]: `count` new sentences from a demo checkpoint's word lists,
    alternately English and Mandarin, spoken with its voices.json's held-out voice and speed."""
    model_dir, folder = Path(model_dir), Path(folder)
    settings = VoiceSettings.load(model_dir / "voices.json")
    words = {lang: (model_dir / f"words-{lang}.txt").read_text(encoding="utf-8").split() for lang in LANGUAGES}
    rng = random.Random(seed)
    clips = []
    for i in range(count):
        lang = ("en", "zh")[i % 2]
        text = sentence(words[lang], lang, rng)
        path = synthesize(text, settings.held_out(lang), folder / f"held-out-{seed}-{i}.wav")
        clips.append((str(path), LANGUAGES[lang], text))
    return clips


def main(argv: list[str] | None = None) -> int:
    """`python -m qasr.models.demo_data TEXT --language en|zh --out speech.wav`: one sentence in the
    held-out voice of a demo checkpoint's voices.json."""
    parser = argparse.ArgumentParser(prog="python -m qasr.models.demo_data",
                                     description="speak a sentence as the demo model's held-out voice")
    parser.add_argument("text")
    parser.add_argument("--language", choices=sorted(LANGUAGES), default="en")
    parser.add_argument("--out", default="speech.wav")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="the checkpoint whose voices.json to use "
                        "(default: this checkout's models/qwen3-asr-demo)")
    parser.add_argument("--pitch", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        voice = VoiceSettings.load(args.model / "voices.json").held_out(args.language, args.pitch)
        print(synthesize(args.text, voice, args.out))
    except (OSError, ValueError, KeyError, TypeError, subprocess.CalledProcessError) as exc:
        parser.exit(1, f"{parser.prog}: error: {_reason(exc)}\n")
    return 0


def _reason(exc: Exception) -> str:
    """One line for what stopped the synthesis: a missing file or tool, a bad voices.json, a tool's error."""
    if isinstance(exc, subprocess.CalledProcessError):
        said = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        return f"{exc.cmd[0]} failed: {said[-1] if said else exc}"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file"
    return first_line(exc)


if __name__ == "__main__":
    raise SystemExit(main())
