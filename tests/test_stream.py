"""Streaming: the official policy step by step, the incremental path against recomputing, segments.

The official streaming code runs on vLLM only; here its own `streaming_transcribe` and
`finish_streaming_transcribe` run with the transformers model standing in for vLLM's `generate`
(the same prompt text, the same accumulated audio, greedy), so the policy under test is the
official code itself, not a re-reading of it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from oracle import relative_error, windowed_encoder
from qwen_asr import Qwen3ASRModel
from qasr.errors import AudioError, UsageError
from qasr.kernels.fbank import clamp_and_scale, log10_mel_batch, log_mel
from qasr.runtime.stream import SegmentAudio, Stream
from qasr.runtime.windows import token_count
from support import DATA, spawn, user_env

torch = pytest.importorskip("torch")
BUDGET = 12
ROOT = Path(__file__).resolve().parents[1]


class TransformersAsVllm:
    """vLLM's `LLM.generate` for one request, computed by the official transformers model."""

    def __init__(self, official, max_new_tokens: int):
        self.official, self.max_new_tokens = official, max_new_tokens

    def generate(self, inputs, sampling_params=None, use_tqdm=False):
        (request,) = inputs
        processor = self.official.processor
        batch = processor(text=[request["prompt"]], audio=request["multi_modal_data"]["audio"],
                          return_tensors="pt", padding=True)
        with windowed_encoder(), torch.no_grad():
            out = self.official.model.generate(**batch, max_new_tokens=self.max_new_tokens)
        ids = out.sequences[0, batch["input_ids"].shape[1]:]
        text = processor.batch_decode([ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        return [SimpleNamespace(outputs=[SimpleNamespace(text=text)])]


@pytest.fixture(scope="module")
def models(model_pair):
    def get(preset="tiny-untied"):
        official, ours = model_pair(preset, BUDGET)
        streaming = Qwen3ASRModel(backend="vllm", model=TransformersAsVllm(official, BUDGET),
                                  processor=official.processor)
        return streaming, ours

    return get


def official_steps(streaming, wav, chunk_seconds, **policy):
    """(language, text) of the official state after every chunk and after the flush."""
    state = streaming.init_streaming_state(chunk_size_sec=chunk_seconds, **policy)
    steps = []
    for start in range(0, len(wav) - state.chunk_size_samples + 1, state.chunk_size_samples):
        streaming.streaming_transcribe(wav[start : start + state.chunk_size_samples], state)
        steps.append((state.language, state.text))
    streaming.streaming_transcribe(wav[len(wav) - len(wav) % state.chunk_size_samples :], state)
    streaming.finish_streaming_transcribe(state)  # with no tail left, the state stands as it is
    steps.append((state.language, state.text))
    return steps


def feed_in_pieces(stream: Stream, wav: np.ndarray, seed: int = 0) -> list:
    """Feed in uneven pieces, as a live source delivers them; all events, finish included."""
    rng = np.random.default_rng(seed)
    events, start = [], 0
    while start < len(wav):
        size = int(rng.integers(1, 12000))
        events += stream.feed(wav[start : start + size])
        start += size
    return events + stream.finish()


CASES = [  # (preset, seconds, chunk seconds, language, context, unfixed chunks, unfixed tokens)
    ("tiny-untied", 11.3, 2.0, None, "", 2, 5),
    ("tiny-untied", 9.0, 1.0, "English", "", 4, 5),
    ("tiny-untied", 17.05, 2.0, None, "交易 停滞", 2, 3),
    ("tiny", 8.5, 2.0, None, "", 2, 5),
    ("tiny", 6.0, 1.5, "Chinese", "会议记录", 1, 7),
    ("tiny-mqa", 9.3, 2.0, None, "", 2, 5),  # 4 s encoder windows
]


@pytest.mark.parametrize("preset,seconds,chunk,language,context,unfixed_chunks,unfixed_tokens", CASES)
def test_every_step_matches_the_official_policy(models, speech, preset, seconds, chunk, language, context,
                                                unfixed_chunks, unfixed_tokens):
    streaming, ours = models(preset)
    wav = speech(seconds, start=1)
    expected = official_steps(streaming, wav, chunk, language=language, context=context,
                              unfixed_chunk_num=unfixed_chunks, unfixed_token_num=unfixed_tokens)
    stream = ours.stream(language=language, context=context, chunk_seconds=chunk, unfixed_chunks=unfixed_chunks,
                         unfixed_tokens=unfixed_tokens, max_new_tokens=BUDGET, segment_seconds=0)
    events = feed_in_pieces(stream, wav)
    assert [(e.language, e.text) for e in events] == expected
    steps = len(expected) - (len(wav) % round(chunk * 16000) == 0)
    assert [e.chunk for e in events] == [*range(1, len(expected)), steps]
    assert events[-1].final and not any(e.final for e in events[:-1])
    assert events[-1].committed == events[-1].text
    assert any(e.text for e in events)


def test_features_equal_log_mel_of_every_prefix(speech):
    wav = speech(9.0)
    wav[80000:] *= 4.0  # a louder part: the clamp floor moves
    audio = SegmentAudio(backend=None, window_frames=800)
    cuts = [150, 199, 200, 201, 359, 360, 361, 799, 800, 801, 32000, 32039, 32040, 32041, 95999, 128040, 144000]
    for start, end in zip([0, *cuts], cuts):
        audio.append(wav[start:end])
        for n in (end, end - 1, max(end - 170, 1)):
            raw, _ = audio.features(n)
            expected = log_mel(wav[:n])
            got = clamp_and_scale(raw.copy(), float(raw.max())) if raw.size else raw
            assert np.array_equal(got, expected), (end, n)


class Counting:
    """Wraps a backend: counts encoded windows and the KV rows each decode kept."""

    def __init__(self, backend):
        self.backend, self.windows, self.kept, self.prefilling, self.owner = backend, 0, [], False, None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode(self, mel, frames, conv_frames):
        self.windows += len(mel)
        return self.backend.encode(mel, frames, conv_frames)

    def prefill(self, ids, audio, start, position):
        """A decode's first prefill chunk starts past the rows its cache kept."""
        if not self.prefilling:
            self.kept.append(position)
        self.prefilling = True
        return self.backend.prefill(ids, audio, start, position)

    def step(self, ids, starts, positions):
        self.prefilling = False
        return self.backend.step(ids, starts, positions)


def run_steps(model, wav, incremental: bool, segment_seconds: float = 0, watch=None, **options):
    """(generated ids, audio embeddings) after every step; `watch(stream)` is called after each."""
    stream = Stream(model, max_new_tokens=BUDGET, segment_seconds=segment_seconds, incremental=incremental, **options)
    steps = []
    for start in range(0, len(wav), 32000):
        for _ in stream.feed(wav[start : start + 32000]):
            steps.append((list(stream.generated), stream.last_embeddings.copy()))
            if watch:
                watch(stream)
    stream.finish()
    steps.append((list(stream.generated), stream.last_embeddings.copy()))
    return steps


def assert_same_steps(fast, slow):
    assert len(fast) == len(slow)
    for (ids, embeds), (ids_ref, embeds_ref) in zip(fast, slow):
        assert ids == ids_ref
        assert embeds.shape == embeds_ref.shape
        assert relative_error(embeds, embeds_ref) <= 1e-5


@pytest.mark.parametrize("preset", ["tiny-untied", "tiny-mqa"])
def test_incremental_equals_recomputing_every_step(models, speech, preset):
    """Same ids and embeddings (1e-5) as re-feeding everything, while windows and KV rows are reused.

    The clip is quiet for 12 s, then loud: the clamp floor rises under the first cached window,
    which must be encoded again. The checkpoints' output follows their audio (checked below); tiny-mqa
    has 4 s windows.
    """
    _, ours = models(preset)
    wav = speech(21.5, start=0)
    wav[:192000] *= 0.02
    counting = Counting(ours.backend)
    ours.backend = counting
    try:
        fast = run_steps(ours, wav, incremental=True, context="hello")
        windows, kept = counting.windows, list(counting.kept)
        slow = run_steps(ours, wav, incremental=False, context="hello")
        other = run_steps(ours, speech(21.5, start=1), incremental=True, context="hello")
    finally:
        ours.backend = counting.backend
    assert len(fast) == 11
    assert_same_steps(fast, slow)
    assert [ids for ids, _ in fast] != [ids for ids, _ in other]  # the output follows the audio
    assert windows < counting.windows - windows  # the re-feed encoded more windows than the stream
    assert all(k > 0 for k in kept[1:])  # every step after the first kept the prompt's cache rows
    assert max(kept) >= kept[1] + 2 * token_count(ours.window_frames)  # and some kept whole cached windows


def test_later_segments_clamp_at_the_stream_s_peak(models, speech):
    """After a loud start, quieter segments whose own peak keeps rising: they clamp at the stream's
    peak, so each of their windows is encoded once, and the steps equal re-feeding each segment's
    audio with that peak (ids, embeddings 1e-5). tiny-mqa: 4 s windows, two cached per segment."""
    _, ours = models("tiny-mqa")
    clip, pause = speech(3.4), np.zeros(6400, dtype=np.float32)
    pieces = [clip, pause]  # then 12 x the clip, each 1.3 times louder, all quieter than the first
    for gain in 0.01 * 1.3 ** np.arange(12):
        pieces += [clip * np.float32(gain), pause]
    wav = np.concatenate(pieces)
    seen = []

    def watch(stream):
        seen.append((stream.segment.offset, list(stream.segment.audio.windows), stream.segment.audio.samples))

    fast = run_steps(ours, wav, incremental=True, segment_seconds=10.0, watch=watch)
    slow = run_steps(ours, wav, incremental=False, segment_seconds=10.0)
    assert_same_steps(fast, slow)
    offsets = sorted({offset for offset, _, _ in seen})
    assert len(offsets) >= 4
    later = [(offset, windows, samples) for offset, windows, samples in seen if offset > offsets[1]]
    for (offset, windows, _), (next_offset, next_windows, _) in zip(later, later[1:]):
        if offset == next_offset:  # within a segment, a cached window is never encoded again
            assert all(a is b for a, b in zip(windows, next_windows))
    assert any(len(windows) >= 2 for _, windows, _ in later)
    whole = {offset: samples for offset, _, samples in later}  # each later segment's audio at its last step
    loud = log10_mel_batch([clip])[0].max()
    rises = 0
    for raw in log10_mel_batch(list(whole.values())):
        assert raw.max() < loud
        rises += raw[:, : ours.window_frames].max() < raw.max()
    assert rises  # clamped at its own peak instead, the floor would have moved under a cached window


def test_segments_close_at_pauses_and_commit(models, speech):
    _, ours = models("tiny-untied")
    pieces = []
    for i in range(8):  # 8 x (4.5 s speech + 0.6 s silence)
        pieces += [speech(4.5, start=i % 2), np.zeros(9600, dtype=np.float32)]
    wav = np.concatenate(pieces)
    stream = ours.stream(max_new_tokens=BUDGET, segment_seconds=6.0)
    events, longest, cuts = [], 0, []
    for start in range(0, len(wav), 5000):
        for event in stream.feed(wav[start : start + 5000]):
            events.append(event)
            longest = max(longest, len(stream.segment.audio.samples))
            cuts.append(stream.segment.offset)
    events += stream.finish()
    committed = [e.committed for e in events]
    assert all(a == b[: len(a)] for a, b in zip(committed, committed[1:]))  # committed only grows
    assert all(e.text.startswith(e.committed) for e in events)
    assert len(stream.closed) >= 4  # the segments closed along the way, not only at the end
    assert events[-1].final and events[-1].committed == events[-1].text
    assert events[-1].audio_seconds == pytest.approx(len(wav) / 16000)
    assert longest <= 8 * 16000  # segments close soon after 6 s: memory stays flat
    level = np.sqrt(np.mean(np.square(wav)))
    for cut in sorted(set(cuts) - {0}):  # every cut inside a pause (inserted, or the recordings' own)
        assert np.sqrt(np.mean(np.square(wav[cut - 1600 : cut + 1600]))) < 0.05 * level


def test_hard_cap_without_pauses(models, speech):
    _, ours = models("tiny-untied")
    noise = np.random.default_rng(0).normal(0, 0.1, 16000 * 13).astype(np.float32)
    stream = ours.stream(max_new_tokens=4, segment_seconds=3.0)
    lengths = []
    for start in range(0, len(noise), 8000):
        stream.feed(noise[start : start + 8000])
        lengths.append(len(stream.segment.audio.samples))
    assert max(lengths) <= 6 * 16000 and len(stream.closed) >= 1


def test_bad_input(models):
    _, ours = models("tiny-untied")
    stream = ours.stream()
    with pytest.raises(AudioError, match="not finite"):
        stream.feed(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(AudioError, match="unsupported sample rate"):
        stream.feed(np.zeros(10, dtype=np.float32), sample_rate=10)
    with pytest.raises(UsageError, match="chunk_seconds"):
        ours.stream(chunk_seconds=0)
    with pytest.raises(UsageError, match="unsupported language"):
        ours.stream(language="Klingon")
    stream.finish()
    with pytest.raises(UsageError, match="finished"):
        stream.feed(np.zeros(10, dtype=np.float32))


def test_resampled_input(models, speech):
    """48 kHz pieces through the stream's resampler give 16 kHz steps of the same audio length."""
    import soxr

    _, ours = models("tiny-untied")
    wav = soxr.resample(speech(5.0), 16000, 48000)
    stream = ours.stream(max_new_tokens=4)
    events = []
    for start in range(0, len(wav), 4801):
        events += stream.feed(wav[start : start + 4801], sample_rate=48000)
    events += stream.finish()
    assert [e.chunk for e in events] == [1, 2, 3]
    assert events[-1].audio_seconds == pytest.approx(5.0, abs=1e-3)


def test_cli_jsonl_matches_the_official_policy(models, bundle, capsys):
    """`qasr stream FILE --format jsonl --segment-seconds 0`: every step as the official state."""
    from qasr.cli import main
    from qasr.runtime.audio import load_audio

    streaming, _ = models("tiny-untied")
    path = str(DATA / "de_22k.flac")
    expected = official_steps(streaming, load_audio(path), 2.0, language=None, context="Guten Tag",
                              unfixed_chunk_num=2, unfixed_token_num=5)
    assert main(["stream", path, "--model", str(bundle("tiny-untied")), "--format", "jsonl", "--segment-seconds",
                 "0", "--max-new-tokens", str(BUDGET), "--context", "Guten Tag", "--threads", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["language"], r["text"]) for r in records] == expected
    assert set(records[0]) == {"chunk", "audio_seconds", "language", "text", "committed", "final", "compute_seconds"}
    assert records[-1]["final"] and {"encoder", "prefill", "decode", "finalize", "rtf"} <= set(records[-1]["timings"])


def qasr_stream(args, stdin: bytes = b""):
    """Run `qasr stream` in a process of its own: (exit code, stdout, stderr)."""
    command = [sys.executable, "-m", "qasr", "stream", *args]
    process = spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=user_env(PYTHONPATH=str(ROOT)))
    out, err = process.communicate(stdin, timeout=300)
    return process.returncode, out.decode(), err.decode()


def test_cli_stdin_pcm(bundle, speech):
    pcm = (speech(5.0) * 32767).astype("<i2").tobytes()
    model = str(bundle("tiny-untied"))
    code, out, err = qasr_stream(["-", "--model", model, "--format", "jsonl", "--max-new-tokens", "4"], pcm)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["chunk"] for r in records] == [1, 2, 3] and records[-1]["audio_seconds"] == 5.0
    import soxr

    pcm44 = (soxr.resample(speech(5.0), 16000, 44100) * 32767).astype("<i2").tobytes()
    code, out, err = qasr_stream(["-", "--model", model, "--sample-rate", "44100", "--max-new-tokens", "4"], pcm44)
    assert code == 0, err
    assert out.strip() and "\x1b" not in out  # off a terminal: committed text only, no redraws


@pytest.mark.parametrize("args,stdin,message", [
    (["-"], b"\x01\x02\x03", "ends in the middle of a sample"),
    (["-"], bytes(32001), "ends in the middle of a sample"),
    (["-"], b"", "no audio"),
    (["-", "--sample-rate", "10"], b"\x00\x00", "unsupported sample rate"),
    ([str(DATA / "de_22k.flac"), "--sample-rate", "8000"], b"", "--sample-rate is for raw PCM"),
    (["/etc/hostname"], b"", "not a readable audio file"),
])
def test_cli_bad_input(bundle, args, stdin, message):
    code, out, err = qasr_stream([*args, "--model", str(bundle("tiny-untied"))], stdin)
    assert code != 0 and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_ctrl_c_prints_committed_text(bundle, speech):
    """Ctrl-C while the stream waits for more audio: what was committed is printed, exit 130.

    The audio comes on a pipe that stays open, and the interrupt is sent only after the first
    committed line was read, so it can never race the stream's own end (a timer could, on a busy
    machine)."""
    import select

    pieces = [p for i in range(3) for p in (speech(4.5, start=i % 2), np.zeros(9600, dtype=np.float32))]
    pcm = (np.concatenate(pieces) * 32767).astype("<i2").tobytes()
    command = [sys.executable, "-m", "qasr", "stream", "-", "--model", str(bundle("tiny-untied")),
               "--max-new-tokens", "4", "--segment-seconds", "3"]
    process = spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=user_env(PYTHONPATH=str(ROOT)))
    try:
        process.stdin.write(pcm)
        process.stdin.flush()
        assert select.select([process.stdout], [], [], 300)[0], "no committed line within 300 s"
        first = process.stdout.readline()
        assert first.strip(), process.stderr.read().decode()
        process.send_signal(signal.SIGINT)
        out, err = first + process.stdout.read(), process.stderr.read()
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
        process.stdin.close()
    assert err.decode() == "qasr: interrupted\n"
    assert len(out.decode().strip().splitlines()) >= 1


def test_terminal_redraws_the_tail_and_prints_committed_once():
    import io

    from qasr.runtime.stream import StreamEvent
    from qasr.stream_cli import _Text

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    show = _Text(out)
    for committed, text, final in [("", "Hello wor", False), ("Hello world.", "Hello world. How", False),
                                   ("Hello world. How are you?", "Hello world. How are you?", True)]:
        show(StreamEvent(1, 2.0, "English", text, committed, final, 0.1))
    assert out.getvalue() == ("\x1b[2mHello wor\x1b[0m\r\x1b[KHello world.\n\x1b[2mHow\x1b[0m"
                              "\r\x1b[KHow are you?\n")


def test_long_stream_stays_flat(models, speech):
    """Three minutes with 10 s segments: the state and the KV cache stop growing after the first segments."""
    _, ours = models("tiny-untied")
    wav = speech(180.0)
    stream = ours.stream(max_new_tokens=BUDGET, segment_seconds=10.0)
    sizes = []
    for start in range(0, len(wav), 32000):
        if stream.feed(wav[start : start + 32000]):
            audio = stream.segment.audio
            sizes.append((len(audio.samples), audio.raw.shape[1], len(stream.segment.prompt),
                          ours.backend.cache.shape[4]))
    stream.finish()
    first, last = np.max(sizes[: len(sizes) // 3], axis=0), np.max(sizes[len(sizes) // 3 :], axis=0)
    assert sizes[-1][0] <= 20 * 16000 and np.all(last <= first * 1.5)
    assert len(stream.closed) >= 8
