"""`qasr stream`: a file or raw PCM on stdin through a Stream, text out as it is recognised.

A file is loaded exactly as `qasr transcribe` loads it and fed in blocks, as fast as it computes
(or paced at 1x with --realtime); `-` reads raw s16le mono PCM from stdin (resampled on the fly
from --sample-rate). On a terminal, committed text is printed once, a line per segment, and the
unstable tail is redrawn in place below it; off a terminal only committed text is written, so a
pipe or a file receives each line once. --format jsonl writes one object per step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np

from qasr.errors import AudioError, UsageError
from qasr.runtime.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE, load_audio
from qasr.runtime.stream import MAX_NEW_TOKENS, SEGMENT_SECONDS
from qasr.runtime.transcribe import Transcriber

BLOCK_SECONDS = 0.1  # what a live source delivers at a time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio", help="an audio file, or - for raw s16le mono PCM on stdin")
    parser.add_argument("--language", help="force the output language (default: identify it)")
    parser.add_argument("--context", default="", help="background text: names, terms, a previous transcript")
    parser.add_argument("--chunk-seconds", type=float, default=2.0, help="audio per step (default 2)")
    parser.add_argument("--unfixed-chunks", type=int, default=2, help="first steps without a text prefix (default 2)")
    parser.add_argument("--unfixed-tokens", type=int, default=5, help="ids rolled back each step (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"tokens generated per step at most (default {MAX_NEW_TOKENS})")
    parser.add_argument("--segment-seconds", type=float, default=SEGMENT_SECONDS,
                        help=f"close a segment at the first pause past this (default {SEGMENT_SECONDS:g}); "
                             "0: one segment, the official policy exactly")
    parser.add_argument("--realtime", action="store_true", help="pace a file at 1x, as a live source")
    parser.add_argument("--sample-rate", type=int, help=f"rate of the stdin PCM (default {SAMPLE_RATE})")
    parser.add_argument("--format", choices=["text", "jsonl"], default="text")


def run(args: argparse.Namespace) -> int:
    rate = args.sample_rate or SAMPLE_RATE
    if args.audio != "-" and args.sample_rate:
        raise UsageError("--sample-rate is for raw PCM on stdin; a file's own rate is read from it")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise UsageError(f"unsupported sample rate {rate} (expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
    if args.audio == "-":
        blocks = _stdin_blocks(rate)
    else:
        blocks = _file_blocks(load_audio(args.audio), args.realtime)  # a bad file fails before the model loads
    model = Transcriber.load(args.model, backend=args.backend, threads=args.threads, weights=args.weights,
                             encoder_weights=args.encoder_weights, precision=args.precision)
    stream = model.stream(language=args.language, context=args.context, chunk_seconds=args.chunk_seconds,
                          unfixed_chunks=args.unfixed_chunks, unfixed_tokens=args.unfixed_tokens,
                          max_new_tokens=args.max_new_tokens, segment_seconds=args.segment_seconds)
    show = _Jsonl() if args.format == "jsonl" else _Text(sys.stdout)
    error = None
    try:
        try:
            for block in blocks:
                for event in stream.feed(block, sample_rate=rate if args.audio == "-" else SAMPLE_RATE):
                    show(event)
        except AudioError as exc:  # a broken end of stdin: what came before is still transcribed
            error = exc
        last_sample = time.perf_counter()
        try:
            for event in stream.finish():
                show(event, _totals(stream, time.perf_counter() - last_sample))
        except AudioError:
            if error is None:  # else too little audio came before the broken end: report that end
                raise
    except KeyboardInterrupt:
        show.interrupted(stream.committed)
        print("qasr: interrupted", file=sys.stderr)
        return 130
    if error:
        raise error
    return 0


def _file_blocks(wave: np.ndarray, realtime: bool):
    """A file's 16 kHz samples in blocks, optionally at the pace a live source would deliver them."""
    step = int(BLOCK_SECONDS * SAMPLE_RATE)
    start = time.perf_counter()
    for begin in range(0, len(wave), step):
        if realtime:
            time.sleep(max(0.0, start + begin / SAMPLE_RATE - time.perf_counter()))
        yield wave[begin : begin + step]


def _stdin_blocks(rate: int):
    """int16 blocks of stdin; a byte left over at the end (half a sample) is an error."""
    source = sys.stdin.buffer
    size = 2 * max(1, int(BLOCK_SECONDS * rate))
    left, total = b"", 0
    while True:
        data = source.read1(size) if hasattr(source, "read1") else source.read(size)
        if not data:
            break
        data = left + data
        whole = len(data) - len(data) % 2
        left = data[whole:]
        total += whole
        if whole:
            yield np.frombuffer(data[:whole], dtype="<i2")
    if not total:
        raise AudioError("<stdin>: no audio (expected raw s16le mono PCM)")
    if left:
        raise AudioError("<stdin>: the PCM ends in the middle of a sample (an odd number of bytes; "
                         "expected s16le, 2 bytes a sample)")


def _totals(stream, finalize_seconds: float) -> dict:
    timings = dict(stream.timings)
    compute = sum(timings.get(k, 0.0) for k in ("frontend", "encoder", "setup", "prefill", "decode"))
    audio = stream.segment.offset + len(stream.segment.audio.samples)
    timings.update(finalize=finalize_seconds, audio=audio / SAMPLE_RATE, rtf=compute / max(audio / SAMPLE_RATE, 1e-9))
    return timings


class _Jsonl:
    """One object per step, the StreamEvent fields as keys; timings on the final one."""

    def __call__(self, event, timings: dict | None = None) -> None:
        record = asdict(event)
        if timings is not None:
            record["timings"] = {k: round(v, 4) for k, v in timings.items()}
        print(json.dumps(record, ensure_ascii=False), flush=True)

    def interrupted(self, committed: str) -> None:
        print(json.dumps({"interrupted": True, "committed": committed}, ensure_ascii=False), flush=True)


class _Text:
    """Committed text once, a line per segment; on a terminal, the unstable tail redrawn in place."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.printed = 0  # characters of committed text already written
        self.tail = False

    def __call__(self, event, timings: dict | None = None) -> None:
        self._erase_tail()
        fresh = event.committed[self.printed :].strip()
        if fresh:
            self.out.write(fresh + "\n")
        self.printed = len(event.committed)
        tail = event.text[len(event.committed) :].strip()
        if self.tty and tail and not event.final:
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\x1b[2m" + tail[-width:] + "\x1b[0m")
            self.tail = True
        self.out.flush()

    def interrupted(self, committed: str) -> None:
        self._erase_tail()
        fresh = committed[self.printed :].strip()
        if fresh:
            self.out.write(fresh + "\n")
        self.out.flush()

    def _erase_tail(self) -> None:
        if self.tail:
            self.out.write("\r\x1b[K")
            self.tail = False
