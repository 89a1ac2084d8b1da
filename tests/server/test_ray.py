"""`qasr serve --ray` on a real local Ray node, every socket on loopback, through the openai SDK.

The module starts one Ray head on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps its
address there) and the real `qasr serve --ray ... --replicas 2` command on it; the text must be
what `qasr transcribe` prints. Teardown sends SIGTERM to the two processes it started and checks
that every process of their sessions is gone.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
os.environ.update(LOOPBACK_ENV)  # before ray is imported (it reads them then): this process is a driver too

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402  (the ray extra, a test dependency: a real local node)

import openai  # noqa: E402  (the official SDK, a test dependency: the real client)
import httpx2 as httpx  # noqa: E402

from qasr.errors import UsageError  # noqa: E402
from qasr.runtime.transcribe import Transcriber  # noqa: E402
from qasr.serve.ray import Placement, builder_options, deployment_options  # noqa: E402
from qasr.serve.service import Options  # noqa: E402
from support import DATA, cli_text, free_port, realtime_transcript, spawn, user_env  # noqa: E402

EN, ZH = str(DATA / "en_16k_s16.wav"), str(DATA / "zh_16k_f32_loud.wav")
TOKENS = 12


def started(argv: list, env: dict, log) -> subprocess.Popen:
    """A process in a session of its own, so teardown can find exactly what it spawned."""
    return spawn(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def session_pids(leader: subprocess.Popen) -> list[int]:
    return [p.pid for p in psutil.process_iter(["pid"]) if _sid(p.pid) == leader.pid]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def end(process: subprocess.Popen, seconds: float = 60) -> int:
    """SIGTERM to one process this module started; its whole session must be gone afterwards."""
    process.send_signal(signal.SIGTERM)
    code = process.wait(seconds)
    deadline = time.monotonic() + seconds
    while session_pids(process) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not session_pids(process), f"left running: {session_pids(process)}"
    return code


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_cache):
    """A Ray head on 127.0.0.1 for this module; yields its address."""
    env = user_env(**LOOPBACK_ENV)
    temp = tempfile.mkdtemp(prefix="qasr-ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w+")
    head = started(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--include-dashboard=false", "--disable-usage-stats", "--num-cpus", "4", "--temp-dir", temp,
                    "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port",
                    str(free_port())], env, log)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in open(log.name).read():
        assert head.poll() is None and time.monotonic() < deadline, open(log.name).read()[-2000:]
        time.sleep(0.5)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    yield address, head
    ray.shutdown()
    end(head)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(cluster, bundle, tmp_path_factory):
    """`qasr serve --ray ADDRESS --replicas 2` (the real command) until the module's last test."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    process = started([sys.executable, "-m", "qasr", "serve", "--ray", cluster[0], "--replicas", "2",
                       "--model", str(bundle("tiny-untied")), "--backend", "onnxruntime", "--threads", "1",
                       "--max-new-tokens", str(TOKENS), "--port", str(port), "--drain-seconds", "20"],
                      user_env(**LOOPBACK_ENV), log)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, log)
    yield url, process, log
    if process.poll() is None:
        end(process)


def wait_healthy(url: str, process: subprocess.Popen, log, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, open(log.name).read()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(open(log.name).read()[-3000:])


def client(url: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=retries)


def transcribe(url: str, path: str, retries: int = 0, **options):
    with open(path, "rb") as f:
        return client(url, retries).audio.transcriptions.create(model="qasr", file=f, **options)


def replica_pids() -> list[int]:
    """The replicas' process ids, through Ray's API (named actors, each asked for its pid)."""
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::")]
    actors = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]
    return ray.get([actor.__ray_call__.remote(lambda self: os.getpid()) for actor in actors], timeout=30)


def test_json_verbose_json_text_and_sse_are_the_cli_text(server, bundle):
    url = server[0]
    expected = cli_text("transcribe", ZH, "--model", bundle("tiny-untied"), "--max-new-tokens", TOKENS)
    assert transcribe(url, ZH).text + "\n" == expected
    assert transcribe(url, ZH, response_format="text") == expected
    verbose = transcribe(url, ZH, response_format="verbose_json")
    assert verbose.text + "\n" == expected and verbose.segments[0].text == verbose.text
    events = list(transcribe(url, ZH, stream=True))
    deltas = [e.delta for e in events[:-1] if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and events[-1].text + "\n" == expected
    assert len(deltas) > 1 and "".join(deltas).strip() == events[-1].text


def test_errors_health_metrics_and_page_are_the_servers(server, bundle):
    url = server[0]
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).audio.transcriptions.create(model="qasr", file=("clip.wav", os.urandom(4000)))
    assert caught.value.body["param"] == "file" and caught.value.body["type"] == "invalid_request_error"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ready" and health["model"] == os.path.basename(str(bundle("tiny-untied")))
    assert "qasr_requests_total" in httpx.get(f"{url}/metrics").text
    assert "<html" in httpx.get(f"{url}/").text
    assert [m.id for m in client(url).models.list()] == [health["model"]]


def test_realtime_websocket_through_the_ray_proxy(server, bundle, speech):
    audio = speech(4)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    stream = Transcriber.load(bundle("tiny-untied"), backend="onnxruntime").stream(language="English")
    stream.feed(pcm.astype(np.float32) / 32768.0)
    expected = stream.finish()[-1].text
    transcript = realtime_transcript(server[0], pcm, transcription={"model": "qasr", "language": "en"})
    assert transcript == expected and expected


def test_eight_concurrent_clients_all_get_the_cli_text(server, bundle):
    expected = {path: cli_text("transcribe", path, "--model", bundle("tiny-untied"), "--max-new-tokens", TOKENS)
                for path in (EN, ZH)}
    got: dict = {}
    threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, transcribe(server[0], (EN, ZH)[n % 2])))
               for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {n: got[n].text + "\n" for n in range(8)} == {n: expected[(EN, ZH)[n % 2]] for n in range(8)}


@pytest.mark.slow
def test_a_replica_killed_mid_load_loses_no_request(server, bundle):
    """Eight clients send requests in a loop; one replica's process is killed once answers flow. Each
    request gets its text: a request the dead replica held comes back as OpenAI's 503, which the
    SDK's own retry sends to the live replica. Serve then starts a new replica."""
    url = server[0]
    expected = cli_text("transcribe", ZH, "--model", bundle("tiny-untied"), "--max-new-tokens", TOKENS)
    before = replica_pids()
    assert len(before) == 2
    answered = threading.Semaphore(0)
    texts: list = []

    def requests():
        for _ in range(6):
            texts.append(transcribe(url, ZH, retries=3).text + "\n")
            answered.release()

    threads = [threading.Thread(target=requests) for _ in range(8)]
    for thread in threads:
        thread.start()
    for _ in range(4):
        answered.acquire()
    os.kill(before[0], signal.SIGKILL)
    for thread in threads:
        thread.join()
    assert texts == [expected] * 48
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(1)
    deadline = time.monotonic() + 180
    while not (len(now := replica_pids()) == 2 and before[0] not in now):
        assert time.monotonic() < deadline, now
        time.sleep(1)


def test_every_socket_is_on_loopback(cluster, server):
    """Ray's processes and the server's: listening and connected on 127.0.0.1 only."""
    pids = session_pids(cluster[1]) + session_pids(server[1])
    sockets = [c for pid in pids for c in _connections(pid)]
    assert sockets
    for conn in sockets:
        for address in (conn.laddr, conn.raddr):
            if address:
                assert _loopback(address.ip), (conn, pids)


def _connections(pid: int) -> list:
    try:
        return psutil.Process(pid).net_connections(kind="inet")
    except psutil.NoSuchProcess:
        return []


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def qasr_serve_ray(address: str, *options) -> subprocess.CompletedProcess:
    """The real command, run to its end; it must fail before serving."""
    return subprocess.run([sys.executable, "-m", "qasr", "serve", "--ray", address, "--port", str(free_port()),
                           "--backend", "onnxruntime", *map(str, options)], env=user_env(**LOOPBACK_ENV),
                          capture_output=True, text=True, timeout=600)


def test_a_second_server_on_the_cluster_is_refused_in_one_line(cluster, server, bundle):
    result = qasr_serve_ray(cluster[0], "--model", bundle("tiny-untied"))
    assert result.returncode == 1 and "already runs on the Ray cluster" in result.stderr
    assert "Traceback" not in result.stderr
    assert httpx.get(f"{server[0]}/health").status_code == 200  # the first one is untouched


def test_sigterm_drains_an_open_session_then_removes_the_application(server, speech):
    """SIGTERM while a realtime session is open: the session still gets its transcript, then the
    command exits 0 with the application and Serve (nothing else ran on it) gone."""
    url, process, log = server
    pcm = (np.clip(speech(2), -1, 1) * 32767).astype("<i2")
    assert realtime_transcript(url, pcm, opened=lambda: process.send_signal(signal.SIGTERM))
    assert process.wait(60) == 0, open(log.name).read()[-3000:]
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_")]


def test_an_address_where_nothing_listens_is_one_line():
    result = qasr_serve_ray(f"127.0.0.1:{free_port()}", "--model", "m")
    assert result.returncode == 1 and "nothing answers at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("replicas", ["0", "two", "3-1", "-2"])
def test_bad_replicas_is_one_line(replicas):
    with pytest.raises(UsageError, match="--replicas"):
        Placement(replicas)


def test_placement_becomes_serve_options():
    options = Options(model="m", threads=2, max_batch=4, max_queue=6, drain_seconds=7)
    fixed = deployment_options(options, Placement("3", gpus_per_replica=0.25))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 10 and fixed["max_queued_requests"] == 6
    assert fixed["ray_actor_options"]["num_cpus"] == 2 and fixed["ray_actor_options"]["num_gpus"] == 0.25
    assert fixed["graceful_shutdown_timeout_s"] == 7
    scaled = deployment_options(options, Placement("1-4", cpus_per_replica=1.5))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert scaled["ray_actor_options"]["num_cpus"] == 1.5


def test_builder_arguments_are_the_serve_options():
    options, placement = builder_options({"model": "m", "replicas": "1-3", "max_batch": "4", "threads": 2,
                                          "cors_origins": "https://a,https://b", "gpus_per_replica": "0.5"})
    assert options == Options(model="m", max_batch=4, threads=2, cors_origins=["https://a", "https://b"])
    assert placement == Placement("1-3", gpus_per_replica=0.5)
    with pytest.raises(UsageError, match="max_bach"):
        builder_options({"model": "m", "max_bach": "4"})
    with pytest.raises(UsageError, match="model="):
        builder_options({"replicas": "2"})


def test_a_model_that_cannot_load_is_one_line_and_exit_1(cluster, tmp_path):
    """Each replica fails to load; Serve gives up on the deployment and the command says why."""
    missing = tmp_path / "no-such-bundle"
    result = qasr_serve_ray(cluster[0], "--model", missing)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "qasr: error:" in line]
    assert len(errors) == 1 and str(missing) in errors[0] and "Traceback" not in result.stderr
