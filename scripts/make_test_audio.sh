#!/usr/bin/env bash
# Regenerate the speech fixtures in tests/data from espeak-ng and sox (libsox-fmt-all for mp3/ogg).
# python-soundfile writes the two files sox cannot: opus (no encoder) and a float WAV above 1.0.
# Deterministic: sox -R fixes its random numbers (noise); espeak-ng is deterministic. Two files
# differ byte-wise between runs, never in their audio: the opus file (random Ogg stream serial
# number) and the float WAV (libsndfile's PEAK chunk carries a timestamp).
# Usage: scripts/make_test_audio.sh [output_dir]   (default: tests/data, about 0.9 MB)
set -euo pipefail

out="${1:-$(dirname "$0")/../tests/data}"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

say() {  # say VOICE TEXT -> $tmp/VOICE.wav (22050 Hz mono int16, espeak-ng's native format)
    espeak-ng -v "$1" -s 150 -w "$tmp/$1.wav" "$2"
}

say en-us "The quick brown fox jumps over the lazy dog."
say en-gb+f3 "Speech recognition on small devices, without a network."
say de "Guten Morgen, wie geht es Ihnen heute?"
say fr+f2 "Bonjour, je voudrais un café, s'il vous plaît."
say es "El reconocimiento de voz funciona sin conexión."
say it "Buongiorno, come stai oggi?"
say cmn "今天天气很好。"

sx() { sox -R -D -V1 "$@"; }  # -D: no dither, so silence stays digital zeros

# One language per format, rate and sample type.
sx "$tmp/en-us.wav" -b 16 "$out/en_16k_s16.wav" rate 16000
sx "$tmp/it.wav" -b 32 -e signed-integer "$out/it_8k_s32.wav" rate 8000
sx "$tmp/de.wav" "$out/de_22k.flac"
sx "$tmp/fr+f2.wav" -C 3 "$out/fr_48k.ogg" rate 48000
sx "$tmp/en-gb+f3.wav" -C 64 "$out/en_44k_stereo.mp3" rate 44100 channels 2

# Four channels, all different: speech, speech at half gain, speech 30 ms late, noise.
sx "$tmp/es.wav" "$tmp/es16.wav" rate 16000
sx "$tmp/es16.wav" "$tmp/half.wav" vol 0.5
sx "$tmp/es16.wav" "$tmp/late.wav" pad 0.03 trim 0 "$(soxi -D "$tmp/es16.wav")"
sx -n -r 16000 -c 1 "$tmp/hiss.wav" synth "$(soxi -D "$tmp/es16.wav")" whitenoise vol 0.05
sx -M "$tmp/es16.wav" "$tmp/half.wav" "$tmp/late.wav" "$tmp/hiss.wav" -b 16 "$out/es_16k_4ch.wav" trim 0 2.0

# What sox cannot write, written by libsndfile: stereo 48 kHz opus (speech left, the same speech
# at a third of the gain right), and a float WAV peaking at 2.5, for the loader's peak rule.
sx "$tmp/es.wav" "$tmp/es48.wav" rate 48000
sx "$tmp/es48.wav" "$tmp/es48q.wav" vol 0.33
sx -M "$tmp/es48.wav" "$tmp/es48q.wav" "$tmp/es48_stereo.wav"
sx "$tmp/cmn.wav" "$tmp/cmn16.wav" rate 16000
python3 - "$tmp" "$out" <<'EOF'
import sys
import soundfile as sf
tmp, out = sys.argv[1:]
data, rate = sf.read(f"{tmp}/es48_stereo.wav", dtype="float32")
sf.write(f"{out}/es_48k_stereo.opus", data, rate, format="OGG", subtype="OPUS")
data, rate = sf.read(f"{tmp}/cmn16.wav", dtype="float32")
sf.write(f"{out}/zh_16k_f32_loud.wav", 3.0 * data, rate, subtype="FLOAT")
EOF

# Not speech, but valid audio: white noise, digital silence, a sub-second clip at 44.1 kHz.
sx -n -r 16000 -c 1 -b 16 "$out/noise_16k.wav" synth 1.0 whitenoise vol 0.3
sx -n -r 16000 -c 1 -b 16 "$out/silence_16k.wav" trim 0 1.0
sx "$tmp/en-us.wav" -b 16 "$out/short_44k.wav" rate 44100 trim 0.35 0.3

du -ch "$out"/* | tail -n 1
