"""The server under load and faults: a bounded queue, dropped clients, loading, health, SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import openai  # the official SDK, a test dependency: the real client
import httpx2 as httpx  # the HTTP client the openai SDK ships with

from qasr.memory import status_kb
from qasr.serve.service import Options, Service
from support import Blocker, DATA, RunningServer, free_port, served, spawn, user_env

EN = DATA / "en_16k_s16.wav"
TOKENS = 12


def metric(server, name: str, **labels) -> float:
    """One sample of /metrics (0 when the series does not exist yet)."""
    text = httpx.get(f"{server.url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def post(server, timeout=60.0):
    with open(EN, "rb") as f:
        return httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.wav", f)},
                          data={"model": "qasr"}, timeout=timeout)


@pytest.fixture(scope="module", params=[1, 4], ids=["max-batch-1", "max-batch-4"])
def small_queue(bundle, request):
    with served(bundle("tiny-untied"), max_new_tokens=TOKENS, max_queue=2, max_batch=request.param) as running:
        yield running


def resident_mb() -> float:
    return status_kb("VmRSS") / 1024


def test_eight_clients_on_a_queue_of_two(small_queue):
    """8 at once, no retries, a few rounds (bounded in count and in time): each answer is the right
    text or a clean 429/503 with Retry-After; memory stays put; the server is healthy after."""
    client = openai.OpenAI(base_url=f"{small_queue.url}/v1", api_key="none", max_retries=0)
    expected = post(small_queue).json()["text"]
    before = metric(small_queue, "qasr_requests_total", route="/v1/audio/transcriptions", status="200")

    def one(_):
        try:
            with open(EN, "rb") as f:
                return client.audio.transcriptions.create(model="qasr", file=f).text
        except openai.APIStatusError as exc:
            assert exc.status_code in (429, 503) and exc.response.headers["retry-after"].isdigit()
            assert exc.body["message"] and "Traceback" not in exc.body["message"]
            return exc.status_code

    outcomes, memory, deadline = [], [], time.monotonic() + 120
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            outcomes += list(pool.map(one, range(8)))
            memory.append(resident_mb())
            if time.monotonic() > deadline:
                break
    assert all(o == expected or o in (429, 503) for o in outcomes), outcomes
    ok = sum(o == expected for o in outcomes)
    assert ok >= len(memory)  # at least the first request of each round is served
    assert memory[-1] - memory[0] < 100, memory  # a leak per request would grow with the 40 requests
    assert httpx.get(f"{small_queue.url}/health").status_code == 200
    assert post(small_queue).json()["text"] == expected
    after = metric(small_queue, "qasr_requests_total", route="/v1/audio/transcriptions", status="200")
    assert after - before == ok + 1
    refused = sum(metric(small_queue, "qasr_requests_total", route="/v1/audio/transcriptions", status=s)
                  for s in ("429", "503"))
    assert refused == len(outcomes) - ok
    assert metric(small_queue, "qasr_queue_depth") == 0
    assert metric(small_queue, "qasr_stage_seconds_count", stage="decode") >= ok + 1
    assert metric(small_queue, "qasr_tokens_total") > 0 and metric(small_queue, "qasr_audio_seconds_total") > 0


def test_a_full_queue_is_refused_at_once_with_retry_after(small_queue):
    service = small_queue.service
    with Blocker(small_queue):
        pending = ThreadPoolExecutor(8)
        waiting = [pending.submit(post, small_queue) for _ in range(2)]
        while service.admitted < 3:
            time.sleep(0.01)
        fill = [pending.submit(post, small_queue) for _ in range(service.options.max_batch - 1)]
        while service.admitted < 2 + service.options.max_batch:
            time.sleep(0.01)
        refused = post(small_queue)
        assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["code"] == "queue_full"
    assert [w.result().status_code for w in waiting + fill] == [200] * (2 + len(fill))


def test_a_client_that_leaves_while_queued_is_dropped(small_queue):
    dropped = metric(small_queue, "qasr_dropped_total")
    decodes = metric(small_queue, "qasr_stage_seconds_count", stage="decode")
    with Blocker(small_queue):
        with pytest.raises(httpx.TimeoutException):
            post(small_queue, timeout=1.0)
        while metric(small_queue, "qasr_dropped_total") == dropped:
            time.sleep(0.05)
    assert metric(small_queue, "qasr_stage_seconds_count", stage="decode") == decodes
    assert small_queue.service.admitted == 0


def test_health_waits_for_the_model_and_requests_get_503_meanwhile(bundle, monkeypatch):
    loaded = threading.Event()
    load = Service._load
    monkeypatch.setattr(Service, "_load", lambda self: (loaded.wait(60), load(self)))
    running = RunningServer(Options(model=str(bundle("tiny-untied")), backend="onnxruntime", max_new_tokens=TOKENS),
                            ready=False)
    try:
        while True:
            try:
                health = httpx.get(f"{running.url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        busy = post(running)
        assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
        assert "loading" in busy.json()["error"]["message"]
        loaded.set()
        running.wait_ready()
        assert post(running).status_code == 200
    finally:
        loaded.set()
        running.stop()


def test_a_model_that_cannot_load_stops_the_server_with_one_line(tmp_path):
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "qasr", "serve", "--model", str(tmp_path / "missing"), "--port",
                           str(port), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 1
    assert "without --api-key" in proc.stderr  # every interface and no key: said before anything else
    errors = [line for line in proc.stderr.splitlines() if "qasr: error:" in line]
    assert len(errors) == 1 and "missing" in errors[0] and "Traceback" not in proc.stderr


def _env():
    return user_env(PYTHONPATH=str(DATA.parent.parent))


def test_sigterm_lets_the_request_in_flight_finish(bundle, speech, tmp_path):
    import soundfile as sf

    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, speech(120), 16000)
    port = free_port()
    proc = spawn([sys.executable, "-m", "qasr", "serve", "--model", str(bundle("tiny-untied")),
                             "--backend", "onnxruntime", "--port", str(port), "--drain-seconds", "60"],
                            stderr=subprocess.PIPE, text=True, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        with ThreadPoolExecutor(1) as pool:
            with open(long_clip, "rb") as f:
                data = f.read()
            answer = pool.submit(httpx.post, f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", data)},
                                 data={"model": "qasr"}, timeout=120)
            while "qasr_queue_depth 1.0" not in httpx.get(f"{url}/metrics").text:
                assert not answer.done(), answer.result().text
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            response = answer.result()
        assert response.status_code == 200 and response.json()["text"] is not None
        # uvicorn shuts down gracefully, then re-raises the signal it caught (systemd counts that as clean)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stderr.read()
        assert "POST /v1/audio/transcriptions 200" in log and "Traceback" not in log
    finally:
        proc.kill()
