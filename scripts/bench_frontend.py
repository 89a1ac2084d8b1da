#!/usr/bin/env python
"""Time qasr's log-mel frontend against its peers, and write the table into docs/benchmarks.md.

    python scripts/bench_frontend.py [--repeats N] [--no-write]

Peers, measured in the same run on the same speech (the tests/data fixtures, concatenated):
transformers' WhisperFeatureExtractor, both its numpy path and its torch path (the one the official
qwen-asr processor uses when torch is installed), and kaldi-native-fbank's OnlineWhisperFbank, an
approximate peer: its frames sit on Kaldi's grid (40 samples later than torch's centred frames),
so its error says "similar features", not "the same features". Errors are max abs against a float64
evaluation of the formula (tests/test_fbank.py). Needs the test dependencies and kaldi-native-fbank.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time
import tracemalloc
from typing import Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import kaldi_native_fbank as knf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from test_audio import concatenated_speech  # noqa: E402
from test_fbank import reference_log_mel  # noqa: E402

from qasr.bench.docs import DOC, write_section  # noqa: E402
from qasr.bench.harness import describe_machine  # noqa: E402
from qasr.kernels.fbank import log_mel  # noqa: E402
from qasr.runtime.audio import SAMPLE_RATE  # noqa: E402

BEGIN, END = "<!-- frontend:begin -->", "<!-- frontend:end -->"
Peers = dict[str, Callable[[np.ndarray], np.ndarray]]


def whisper_paths() -> Peers:
    fe = transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)
    return {
        "WhisperFeatureExtractor, numpy path": lambda w: fe._np_extract_fbank_features(w[None], "cpu")[0],
        "WhisperFeatureExtractor, torch path": lambda w: fe._torch_extract_fbank_features(w[None], "cpu")[0],
    }


def kaldi_native_fbank(wave: np.ndarray) -> np.ndarray:
    """OnlineWhisperFbank's mel power, then Whisper's log10, clamp and scale (included in the time)."""
    options = knf.WhisperFeatureOptions()
    options.dim = 128
    fbank = knf.OnlineWhisperFbank(options)
    fbank.accept_waveform(SAMPLE_RATE, wave)
    fbank.input_finished()
    power = np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)], dtype=np.float32).T
    log_spec = np.log10(np.maximum(power, 1e-10))
    return (np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0


def timed(peers: Peers, wave: np.ndarray, repeats: int) -> dict[str, tuple[list[float], np.ndarray]]:
    """{name: (seconds per run, features)}. Runs interleave, so other jobs' load hits all peers alike."""
    outputs = {name: fn(wave) for name, fn in peers.items()}  # warm-up: plans, threads, caches
    times: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(repeats):
        for name, fn in peers.items():
            start = time.perf_counter()
            fn(wave)
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], outputs[name]) for name in peers}


def max_error(features: np.ndarray, reference: np.ndarray) -> float:
    frames = min(features.shape[1], reference.shape[1])
    return float(np.abs(features[:, :frames] - reference[:, :frames]).max())


def peak_memory(wave: np.ndarray) -> float:
    tracemalloc.start()
    log_mel(wave)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def table(repeats: int) -> str:
    peers = {"qasr log_mel": log_mel, **whisper_paths(), "kaldi-native-fbank (approximate peer)": kaldi_native_fbank}
    rows = [
        "| audio | implementation | median ms | spread (min-max) ms | x log_mel time | max abs err vs float64 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, seconds, n in [("10 s", 10, repeats * 5), ("10 min", 600, repeats)]:
        wave = concatenated_speech(seconds)
        reference = reference_log_mel(wave)
        results = timed(peers, wave, n)
        ours_median = statistics.median(results["qasr log_mel"][0])
        for name, (times, out) in results.items():
            median = statistics.median(times)
            rows.append(
                f"| {label} | {name} | {median * 1e3:.1f} | {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}"
                f" | {median / ours_median:.2f} | {max_error(out, reference):.1e} |"
            )
            print(rows[-1], flush=True)
    mib = peak_memory(concatenated_speech(600))
    audio_mib = 600 * SAMPLE_RATE * 4 / 2**20
    features_mib = 128 * 600 * 100 * 4 / 2**20
    return "\n".join(rows) + (
        f"\n\nPeak memory of log_mel on 10 min (tracemalloc): {mib:.1f} MiB, of which the output "
        f"features are {features_mib:.1f} MiB (the input audio, {audio_mib:.1f} MiB, is not copied)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs on 10 min (5x as many on 10 s)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    command = " ".join(["python", "scripts/bench_frontend.py", *sys.argv[1:]])
    peers = f"torch with {torch.get_num_threads()} threads, kaldi-native-fbank {knf.__version__}"
    header = f"## Log-mel frontend\n\n{datetime.date.today().isoformat()}, `{command}`\n\n{describe_machine()}; {peers}\n"
    print(header)
    body = table(args.repeats)
    print(body.split("\n\n")[-1])
    text = (
        f"{header}\n{body}\n\n'x log_mel time' is each implementation's median over log_mel's median "
        "(above 1: slower); runs of all implementations interleave, so load from other jobs on the machine "
        "hits them alike, and the spread shows how much it moved each figure. kaldi-native-fbank is an "
        "approximate peer (Kaldi frame grid, its own FFT); its error is not a parity figure."
    )
    if not args.no_write:
        write_section(DOC, BEGIN, END, text)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
