"""The demo model (models/qwen3-asr-demo) transcribes speech it never heard, on every path.

Held-out sentences from its word lists are spoken at test time by espeak-ng with the voice and
speed its training never used. The server's text must be the CLI's and the official package's
transcripts qasr's. The CER bounds are what this model reaches on these 6 short clips (69
characters: one character is 1.4 points) with a margin: it reaches 0 % on every path here
(fp32, int8, int4, both streaming policies; 2.6 % fp32 on the 20 clips of scripts/bench_demo.py),
and 0 % with seconds of zeros around each clip, as a microphone hears a sentence. The bounds
allow fp32 5 characters (8 %, for another espeak-ng build's voices), int8 one character more
than fp32, int4, streaming and the quiet margins two. See docs/demo-model.md.
"""

from __future__ import annotations

import json

import pytest

from qasr.cli import main
from qasr.export.quantize import quantize_bundle
from qasr.models.demo_data import with_quiet
from qasr.runtime.audio import load_audio
from qasr.runtime.transcribe import Transcriber
from qasr.runtime.verify import corpus_cer as cer
from support import cli_text, served

FP32_CER = 0.08




@pytest.fixture(scope="module")
def clips(held_out):
    return held_out(6)


@pytest.fixture(scope="module")
def quantized(demo_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-quant")
    done = lambda line: None  # noqa: E731
    return {"int8": quantize_bundle(demo_bundle, folder / "int8", "int8", progress=done),
            "int4": quantize_bundle(demo_bundle, folder / "int4", "int4", encoder_weights="int8", progress=done)}


@pytest.fixture(scope="module")
def offline(demo_bundle, clips):
    """fp32 results on ONNX Runtime: [(language, text)] per clip."""
    model = Transcriber.load(str(demo_bundle), backend="onnxruntime")
    return [(r.language, r.text) for r in (model.transcribe(path) for path, _, _ in clips)]


def test_fp32_transcribes_held_out_speech(clips, offline):
    assert [lang for lang, _ in offline] == [lang for _, lang, _ in clips]
    measured = cer(zip([t for _, t in offline], [t for _, _, t in clips]))
    assert measured <= FP32_CER, (measured, offline)


@pytest.mark.parametrize("weights, rise", [("int8", 0.02), ("int4", 0.03)])
def test_quantized_weights_stay_near_fp32(clips, offline, quantized, weights, rise):
    model = Transcriber.load(str(quantized[weights]), backend="onnxruntime")
    texts = [model.transcribe(path).text for path, _, _ in clips]
    truth = [t for _, _, t in clips]
    assert cer(zip(texts, truth)) <= cer(zip([t for _, t in offline], truth)) + rise, (texts, offline)


@pytest.mark.parametrize("segment", [None, "0"])
def test_streaming_stays_near_offline(clips, offline, demo_bundle, segment):
    truth = [t for _, _, t in clips]
    texts = []
    for path, _, _ in clips:
        argv = ["stream", path, "--model", demo_bundle, "--format", "jsonl"]
        events = cli_text(*argv, *(["--segment-seconds", segment] if segment else [])).splitlines()
        final = json.loads(events[-1])
        assert final["final"]
        texts.append(final["text"])
    assert cer(zip(texts, truth)) <= cer(zip([t for _, t in offline], truth)) + 0.03, (texts, offline)


@pytest.mark.parametrize("before, after", [(1.0, 3.0), (2.0, 6.0)])
def test_quiet_around_a_sentence_keeps_its_text(clips, offline, demo_bundle, before, after):
    """Seconds of zeros before and after (2 + 6 s spans two encoder windows): the fine-tuning on
    quiet margins (docs/demo-model.md) keeps the text; before it, a second changed every clip."""
    model = Transcriber.load(str(demo_bundle), backend="onnxruntime")
    texts = [model.transcribe(with_quiet(load_audio(path), before, after), sample_rate=16000).text
             for path, _, _ in clips]
    truth = [t for _, _, t in clips]
    assert cer(zip(texts, truth)) <= cer(zip([t for _, t in offline], truth)) + 0.03, (texts, offline)


def test_the_checkpoint_directory_gives_the_bundle_text(clips, offline):
    """`qasr transcribe --model models/qwen3-asr-demo` exports it into the cache on first use."""
    from conftest import DEMO_MODEL

    assert cli_text("transcribe", clips[0][0], "--model", DEMO_MODEL) == offline[0][1] + "\n"


def test_the_official_package_gives_the_same_transcripts(clips, offline):
    import oracle
    from conftest import DEMO_MODEL

    official = oracle.load_official(DEMO_MODEL, max_new_tokens=64)
    for (path, _, _), (language, text) in zip(clips, offline):
        result, _ = oracle.official_transcribe(official, (load_audio(path), 16000))
        assert (result.language, result.text) == (language, text)


def test_the_server_gives_the_cli_text(clips, demo_bundle):
    import openai

    with served(demo_bundle) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        for path, _, _ in clips:
            with open(path, "rb") as f:
                text = client.audio.transcriptions.create(model="qasr", file=f, response_format="text")
            assert text == cli_text("transcribe", path, "--model", demo_bundle)


def test_verify_reports_cer_against_the_given_text(capsys, clips, quantized):
    paths, texts = [p for p, _, _ in clips], [t for _, _, t in clips]
    code = main(["verify", str(quantized["int8"]), *paths, *[a for t in texts for a in ("--text", t)],
                 "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    truth = report["figures"]["truth"]
    assert truth["cer"] == pytest.approx(cer(zip([c["text"] for c in report["clips"]], texts)))
    assert truth["reference_cer"] <= FP32_CER
    assert truth["rise"] == pytest.approx(truth["cer"] - truth["reference_cer"])
    assert code == (0 if report["shortfall"] is None else 1)


def test_verify_wants_one_text_per_audio(capsys, clips, quantized):
    code = main(["verify", str(quantized["int8"]), clips[0][0], clips[1][0], "--text", "one"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "give one per audio" in err


def test_speaking_a_sentence_without_the_voices_file_is_one_line(tmp_path):
    """`python -m qasr.models.demo_data` (README's way to make test speech) from any directory: it
    finds the checkout's demo model itself, and a checkpoint without voices.json is one line."""
    import subprocess
    import sys

    from qasr.models.demo_data import DEMO_MODEL

    assert (DEMO_MODEL / "voices.json").is_file()
    done = subprocess.run([sys.executable, "-m", "qasr.models.demo_data", "hello", "--model", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"python -m qasr.models.demo_data: error: {tmp_path / 'voices.json'}: no such file"
