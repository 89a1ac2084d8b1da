"""`qasr serve` through the official `openai` SDK against a real uvicorn server on loopback.

The text must be what `qasr transcribe` prints for the same file and options (the tiny random
checkpoints give arbitrary but deterministic text, which is all a comparison needs).
"""

from __future__ import annotations

import os

import pytest

import openai  # the official SDK, a test dependency: the real client
import httpx2 as httpx  # the HTTP client the openai SDK ships with

from qasr.runtime.prompt import parse_output
from qasr.runtime.tokenizer import Tokenizer
from qasr.serve.openai_api import TextDeltas
from support import DATA, cli_text, served

EN, DE, ZH = str(DATA / "en_16k_s16.wav"), str(DATA / "de_22k.flac"), str(DATA / "zh_16k_f32_loud.wav")
TOKENS = 12


@pytest.fixture(scope="module")
def server(bundle):
    with served(bundle("tiny-untied"), max_new_tokens=TOKENS, max_upload_mb=1) as running:
        yield running


@pytest.fixture(scope="module")
def aligned(bundle):
    with served(bundle("tiny-untied"), aligner=str(bundle("tiny-aligner")), max_new_tokens=TOKENS, api_key="sekrit") as running:
        yield running


def client(server, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def transcribe(server, path, key="none", **options):
    with open(path, "rb") as f:
        return client(server, key).audio.transcriptions.create(model="qasr", file=f, **options)


@pytest.mark.parametrize("path", [EN, DE])
def test_json_text_and_verbose_json_are_the_cli_text(server, bundle, path):
    expected = cli_text("transcribe", path, "--model", bundle("tiny-untied"), "--max-new-tokens", TOKENS)
    assert transcribe(server, path).text + "\n" == expected
    assert transcribe(server, path, response_format="text") == expected
    verbose = transcribe(server, path, response_format="verbose_json")
    assert verbose.text + "\n" == expected
    assert verbose.duration == pytest.approx(float(cli_text("transcribe", path, "--model", bundle("tiny-untied"),
                                                       "--max-new-tokens", TOKENS, "--format", "json")
                                                   .split('"duration": ')[1].split(",")[0]))
    assert verbose.segments[0].text == verbose.text and verbose.words is None


def test_language_code_and_prompt_are_the_cli_options(server, bundle):
    expected = cli_text("transcribe", DE, "--model", bundle("tiny-untied"), "--max-new-tokens", TOKENS,
                   "--language", "German", "--context", "Grüße aus Köln")
    for language in ("de", "German", "german"):
        got = transcribe(server, DE, language=language, prompt="Grüße aus Köln", response_format="text")
        assert got == expected


@pytest.mark.parametrize("language", [None, "zh"])
def test_stream_sends_deltas_then_the_cli_text(server, bundle, language):
    forced = ("--language", "Chinese") if language else ()
    expected = cli_text("transcribe", ZH, "--model", bundle("tiny-untied"), "--max-new-tokens", TOKENS, *forced)
    with open(ZH, "rb") as f:
        events = list(client(server).audio.transcriptions.create(model="qasr", file=f, stream=True,
                                                                 **({"language": language} if language else {})))
    assert events[-1].type == "transcript.text.done" and events[-1].text + "\n" == expected
    deltas = [e.delta for e in events[:-1] if e.type == "transcript.text.delta"]
    assert len(deltas) == len(events) - 1
    # Forced or not, the random model's output is text from its first tokens (it never writes the
    # "language X<asr_text>" metadata), so it streams as it comes and the deltas join to the final text.
    assert len(deltas) > 1 and "".join(deltas).strip() == events[-1].text


@pytest.mark.parametrize("output", [
    "Hello world.",                                # no metadata: text from the first token
    "language English<asr_text> Hi there.",        # the metadata is held back, then the text after it
    "language English\nlanguage French<asr_text>Hi",
    "langue d'oc",                                 # held while it could still be "language ", then sent
    "language None<asr_text>",
])
def test_text_deltas_stream_what_parse_output_keeps(checkpoint, output):
    tokenizer = Tokenizer.from_dir(checkpoint("tiny"))
    deltas = TextDeltas(tokenizer, forced=False)
    sent = [deltas.push(token) for token in tokenizer.encode(output)]
    assert "".join(sent).strip() == parse_output(output, None)[1]
    if not output.startswith("lang"):
        assert sent[0]  # the first token already streams


def test_models_lists_the_served_id(server, bundle):
    ids = [m.id for m in client(server).models.list()]
    assert ids == [os.path.basename(str(bundle("tiny-untied")))]


@pytest.mark.parametrize("content, options, param", [
    (os.urandom(4000), {}, "file"),
    (b"", {}, "file"),
    (None, {"response_format": "docx"}, "response_format"),
    (None, {"temperature": 0.7}, "temperature"),
    (None, {"language": "klingon"}, "language"),
    (None, {"prompt": "names: <|audio_pad|>"}, "prompt"),
    (None, {"response_format": "srt"}, "response_format"),
    (None, {"response_format": "verbose_json", "timestamp_granularities": ["word"]}, "timestamp_granularities"),
])
def test_bad_requests_get_a_400_with_openais_error_body(server, content, options, param):
    data = open(EN, "rb").read() if content is None else content
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).audio.transcriptions.create(model="qasr", file=("clip.wav", data), **options)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    if options.get("response_format") == "srt" or "timestamp_granularities" in options:
        assert "--aligner" in error["message"]


def test_an_upload_over_the_limit_gets_a_413(server):
    big = (DATA / "en_16k_s16.wav").read_bytes() * 40
    assert len(big) > 1024 * 1024
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).audio.transcriptions.create(model="qasr", file=("big.wav", big))
    assert caught.value.status_code == 413 and "--max-upload-mb" in caught.value.body["message"]
    response = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.wav", big)},
                          data={"model": "qasr"}, headers={"Transfer-Encoding": "chunked"})
    assert response.status_code == 413


def test_the_key_is_required_on_the_api_but_not_on_health(aligned):
    with pytest.raises(openai.AuthenticationError) as caught:
        transcribe(aligned, EN, key="wrong")
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{aligned.url}/v1/models").status_code == 401
    assert httpx.get(f"{aligned.url}/health").json()["status"] == "ready"
    assert transcribe(aligned, EN, key="sekrit").text


def test_subtitles_and_word_times_are_the_cli_ones(aligned, bundle):
    model, aligner = bundle("tiny-untied"), bundle("tiny-aligner")
    for fmt in ("srt", "vtt"):
        expected = cli_text("transcribe", EN, "--model", model, "--aligner", aligner, "--max-new-tokens", TOKENS,
                       "--format", fmt)
        assert transcribe(aligned, EN, key="sekrit", response_format=fmt) == expected
    verbose = transcribe(aligned, EN, key="sekrit", response_format="verbose_json", timestamp_granularities=["word"])
    assert verbose.words and all(w.start <= w.end for w in verbose.words)
    assert [s.text for s in verbose.segments] == [c.split("\n")[1] for c in expected.split("\n\n")[1:] if c]


def test_unknown_routes_and_methods_get_openais_error_body(server):
    response = httpx.get(f"{server.url}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"]
    response = httpx.get(f"{server.url}/v1/audio/transcriptions")
    assert response.status_code == 405 and response.json()["error"]["message"]


def test_no_cors_unless_an_origin_is_given(server, bundle):
    preflight = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{server.url}/v1/models", headers=preflight).headers
    with served(bundle("tiny-untied"), cors_origins=["http://elsewhere.example"]) as allowed:
        response = httpx.options(f"{allowed.url}/v1/models", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_the_key_can_come_from_the_environment(monkeypatch):
    from qasr.cli import build_parser

    monkeypatch.setenv("QASR_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
