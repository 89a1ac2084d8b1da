"""`qasr serve --max-batch 4`: concurrent requests share the decoder's steps and each still gets
the text `qasr transcribe` gives alone (real openai SDK, real uvicorn on loopback, tiny checkpoints).

To make the overlap certain rather than a matter of timing, the worker is held (by work that
blocks it, as a slow step would) while the requests queue; released, it takes them all into one
batch. Realtime sessions' steps join that batch too, beside file requests.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import openai  # the official SDK, a test dependency: the real client
import httpx2 as httpx  # the HTTP client the openai SDK ships with

from qasr.cli import main
from support import Blocker, DATA, realtime_transcript, served

FILES = [DATA / "en_16k_s16.wav", DATA / "de_22k.flac", DATA / "fr_48k.ogg", DATA / "zh_16k_f32_loud.wav"]
TOKENS = 12


def cli_text(bundle, path, *options) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["transcribe", str(path), "--model", str(bundle("tiny-untied")), "--max-new-tokens",
                     str(TOKENS), *options]) == 0
    return out.getvalue().rstrip("\n")


@pytest.fixture(scope="module")
def server(bundle):
    with served(bundle("tiny-untied"), max_new_tokens=TOKENS, max_batch=4, max_queue=4) as running:
        yield running


def batch_steps(server, up_to: float | None = None) -> float:
    """Decode steps so far, from the qasr_batch_size histogram: all, or those of at most `up_to` requests."""
    text = httpx.get(f"{server.url}/metrics").text
    series = f'qasr_batch_size_bucket{{le="{up_to}"}}' if up_to else "qasr_batch_size_count"
    return float(re.search(rf"^{re.escape(series)} (\S+)$", text, re.M).group(1))


def batch_sizes(server) -> tuple[float, float]:
    """(steps with more than one request, all steps)."""
    count = batch_steps(server)
    return count - batch_steps(server, 1.0), count


def held_then_released(server, calls, queued=None):
    """Run `calls` concurrently while the worker is held, so `queued` of them (all) wait, then release it."""
    with ThreadPoolExecutor(len(calls)) as pool:
        with Blocker(server):
            futures = [pool.submit(call) for call in calls]
            while server.service.admitted < 1 + (queued or len(calls)):
                time.sleep(0.01)
        return [f.result() for f in futures]


def create(server, path, **options):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model="qasr", file=f, **options)


def test_four_concurrent_files_share_steps_and_each_gets_its_cli_text(server, bundle):
    expected = [cli_text(bundle, path) for path in FILES[:3]] + [cli_text(bundle, FILES[3], "--language", "Chinese")]
    shared_before, _ = batch_sizes(server)

    def streamed():  # the fourth streams its deltas while it shares the batch
        return list(create(server, FILES[3], stream=True, language="zh"))

    answers = held_then_released(server, [lambda p=p: create(server, p).text for p in FILES[:3]] + [streamed])
    assert answers[:3] == expected[:3]
    events = answers[3]
    assert events[-1].type == "transcript.text.done" and events[-1].text == expected[3]
    deltas = [e.delta for e in events[:-1]]
    assert len(deltas) > 1 and "".join(deltas).strip() == events[-1].text
    shared, steps = batch_sizes(server)
    assert shared - shared_before >= 1, (shared, steps)  # at least one step decoded two or more requests
    assert batch_steps(server, 3.0) < steps  # all 4


def test_a_bad_file_among_good_ones_gets_its_400_and_the_others_succeed(server, bundle):
    good = [cli_text(bundle, path) for path in FILES[:3]]

    def bad():
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.audio.transcriptions.create(model="qasr", file=("clip.wav", b"RIFF" + bytes(range(256)) * 8))
        return caught.value.status_code, caught.value.body["param"]

    answers = held_then_released(server, [lambda p=p: create(server, p).text for p in FILES[:3]] + [bad], queued=3)
    assert answers == good + [(400, "file")]
    assert server.service.admitted == 0


def test_realtime_sessions_share_the_batch_with_a_file_and_each_gets_its_stream_text(server, bundle, speech):
    """Two sessions' stream steps and a file request decode in the same steps, and each session's
    transcript is what `Transcriber.stream()` gives alone for its audio."""
    import numpy as np

    from qasr.runtime.transcribe import Transcriber

    clips = [np.round(speech(5.0, start=i) * 32767).astype("<i2") for i in range(2)]
    model = Transcriber.load(bundle("tiny-untied"), backend="onnxruntime")
    expected = []
    for clip in clips:
        stream = model.stream()
        stream.feed(clip)
        expected.append(stream.finish()[-1].text)
    file_text = cli_text(bundle, FILES[0])
    steps_before, small_before = batch_steps(server), batch_steps(server, 2.0)

    with ThreadPoolExecutor(3) as pool:
        with Blocker(server):
            sessions = [pool.submit(realtime_transcript, server.url, clip) for clip in clips]
            while server.service.worker.inbox.qsize() < 2:  # both sessions' first steps wait
                time.sleep(0.01)
            upload = pool.submit(lambda: create(server, FILES[0]).text)
            while server.service.worker.inbox.qsize() < 3:
                time.sleep(0.01)
        assert [s.result() for s in sessions] == expected and all(expected)
        assert upload.result() == file_text
    held_three = (batch_steps(server) - steps_before) - (batch_steps(server, 2.0) - small_before)
    assert held_three >= 1  # a step held all three
