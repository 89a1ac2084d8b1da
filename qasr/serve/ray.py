"""`qasr serve` on a Ray cluster: Ray Serve routes between replicas of the one FastAPI app.

Each replica is a Ray actor holding one Service (one loaded model, its own continuous batch) and
the app `create_app` builds over it, so the routes, errors, key, limits, /metrics and the page are
those of `qasr serve`. Ray Serve's proxy takes HTTP, server-sent events and WebSockets and sends
each request to a replica with room (at most --max-batch + --max-queue in flight on each), checks
the replicas' health, restarts one that dies and scales between a minimum and a maximum. A replica
loads its model before it takes traffic, and picks its backend on its own node (auto); replicas on
one node share the model cache, whose lock makes a first-use download or export happen once.

Run it with `qasr serve --ray ADDRESS --replicas N`, or `serve run qasr.serve.ray:app model=...`
(the application builder below) and a Serve config file (docs/ray.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import socket
import threading

import ray
from ray import serve
from ray.serve._private import replica
from starlette.middleware import Middleware

from qasr.errors import UsageError, first_line
from qasr.runtime.backends.onnxruntime_cpu import share_threads
from qasr.serve.app import create_app
from qasr.serve.openai_api import ApiError
from qasr.serve.server import announce
from qasr.serve.service import Options, Service

log = logging.getLogger("qasr.serve")
APP_NAME = "qasr"
PASSED_ENV = ("QASR_CACHE", "HF_HOME", "HF_HUB_OFFLINE")  # where replicas find (and keep) models
# Ray Serve's hook for middleware on its HTTP proxies (read where each proxy starts).
PROXY_CALLBACK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "qasr.serve.ray:proxy_middlewares"}


@serve.ingress()
class Replica:
    """One loaded model and the app over it; Serve sends it traffic once the constructor returns."""

    async def __init__(self, options: Options):  # type: ignore[misc]  # Serve awaits an async constructor
        _bind_grpc_to_node()
        share_threads(options.threads)  # the replica's process is this model's alone
        self.service = Service(options)
        self.service.start_loading()
        while self.service.state == "loading":
            await asyncio.sleep(0.1)
        if self.service.state == "failed":  # Serve retries the replica, then reports the deployment failed
            raise UsageError(self.service.error or "the model failed to load")

    def __serve_build_asgi_app__(self):
        return create_app(self.service)


class ReplicaLost:
    """Proxy middleware. When a replica dies under a request, Serve's proxy ends it without any
    response (the client would see a bare 500); this answers OpenAI's error body instead, a 503
    with Retry-After, which the openai SDK retries on a live replica."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, receive, watched)
        if not started:
            lost = ApiError(503, "the replica serving this request stopped before answering; retry it",
                            code="replica_lost", kind="server_error", headers={"Retry-After": "1"})
            await lost.response()(scope, receive, send)


def proxy_middlewares() -> list:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH's target: the middleware each Serve proxy adds."""
    return [Middleware(ReplicaLost)]


def _bind_grpc_to_node() -> None:
    """Ray Serve (2.60) opens each replica's inter-deployment gRPC port, which this app never calls,
    on every interface ("[::]:0", after the constructor runs). Bind it on the address the node is
    registered at instead, so a node started on 127.0.0.1 listens on loopback only."""
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node
    opened = getattr(replica, "add_port_to_grpc_server", None)
    if opened is not None and not getattr(opened, "qasr_bound", False):
        def bound(server, address: str):
            return opened(server, address.replace("[::]", host, 1))

        bound.qasr_bound = True  # type: ignore[attr-defined]
        replica.add_port_to_grpc_server = bound


@dataclasses.dataclass
class Placement:
    """How many replicas and what each one reserves on its node."""

    replicas: str = "1"             # N, "auto", or "MIN-MAX" (Serve's autoscaling on ongoing requests)
    gpus_per_replica: float = 0.0   # fractions share a GPU between replicas
    cpus_per_replica: float | None = None  # default: --threads, else 1

    def __post_init__(self):
        """Bad placement is one line before anything connects."""
        parse_replicas(self.replicas)
        if self.gpus_per_replica < 0 or (self.cpus_per_replica is not None and self.cpus_per_replica <= 0):
            raise UsageError("--gpus-per-replica must be 0 or more and --cpus-per-replica more than 0")


def parse_replicas(value: str) -> dict:
    """`N` -> a fixed count; `auto` -> 1 up to the cluster's room; `MIN-MAX` -> Serve's autoscaling bounds."""
    value = str(value).strip().lower()
    if value.isdigit() and int(value) > 0:
        return {"num_replicas": int(value)}
    if value == "auto":
        return {"min_replicas": 1, "max_replicas": None}
    bounds = re.fullmatch(r"(\d+)-(\d+)", value)
    if bounds and 0 <= int(bounds[1]) <= int(bounds[2]) and int(bounds[2]) > 0:
        return {"min_replicas": int(bounds[1]), "max_replicas": int(bounds[2])}
    raise UsageError(f"--replicas {value!r}: give a count (2), auto, or a range (1-4)")


def deployment_options(options: Options, placement: Placement) -> dict:
    """Serve's deployment options for these server options and this placement."""
    cpus = placement.cpus_per_replica or options.threads or 1
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    actor = {"num_cpus": cpus, "num_gpus": placement.gpus_per_replica, "runtime_env": {"env_vars": env}}
    room = options.max_batch + options.max_queue
    scale = parse_replicas(placement.replicas)
    out = {"ray_actor_options": actor, "max_ongoing_requests": room, "max_queued_requests": options.max_queue,
           "graceful_shutdown_timeout_s": options.drain_seconds, "health_check_period_s": 5}
    if "num_replicas" in scale:
        return {**out, "num_replicas": scale["num_replicas"]}
    most = scale["max_replicas"] or _room_for(actor)
    return {**out, "autoscaling_config": {"min_replicas": scale["min_replicas"], "max_replicas": most,
                                          "target_ongoing_requests": options.max_batch}}


def _room_for(actor: dict) -> int:
    """How many replicas the connected cluster's resources hold (at least 1): --replicas auto's ceiling."""
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) / actor["num_cpus"]]
    if actor["num_gpus"]:
        fits.append(total.get("GPU", 0) / actor["num_gpus"])
    return max(1, int(min(fits)))


def application(options: Options, placement: Placement):
    """The bound Serve application: Replica with these options, placed as asked."""
    return serve.deployment(name=APP_NAME, **deployment_options(options, placement))(Replica).bind(options)


def app(args: dict):
    """The builder for `serve run qasr.serve.ray:app model=BUNDLE replicas=2 ...` and Serve config files."""
    return application(*builder_options(args))


def builder_options(args: dict) -> tuple[Options, Placement]:
    """The builder's arguments (strings on a command line, typed in a config file): every `qasr serve`
    option by its Options name, plus replicas, gpus_per_replica and cpus_per_replica."""
    args = dict(args)
    placement = Placement(**{f.name: _typed(f, args.pop(f.name)) for f in dataclasses.fields(Placement)
                             if f.name in args})
    known = {f.name: f for f in dataclasses.fields(Options)}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise UsageError(f"unknown application argument {unknown[0]!r}; known: "
                         f"{', '.join(sorted(known) + [f.name for f in dataclasses.fields(Placement)])}")
    if "model" not in args:
        raise UsageError("the application needs model=BUNDLE (a bundle, checkpoint or Hugging Face id)")
    return Options(**{name: _typed(known[name], value) for name, value in args.items()}), placement


def _typed(field: dataclasses.Field, value):
    """A config-file or command-line string as the field's type (CORS origins: a comma list)."""
    kind = str(field.type)
    if value is None or not isinstance(value, str) or kind.startswith("str"):
        return value
    if kind.startswith("list"):
        return [part for part in value.split(",") if part]
    number = float if "float" in kind else int
    try:
        return number(value)
    except ValueError:
        raise UsageError(f"{field.name}={value!r} is not a number") from None


def run(options: Options, placement: Placement, address: str, host: str, port: int) -> int:
    """Deploy onto the running cluster at `address`, serve on host:port until SIGINT/SIGTERM, then
    delete the application (each replica drains for --drain-seconds). 1 when it could not deploy."""
    announce(options, host)
    _check_listening(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot connect to the Ray cluster at {address}: {first_line(exc)}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": PROXY_CALLBACK}})
    if APP_NAME in serve.status().applications:  # Serve has one HTTP port and route "/" per cluster
        raise UsageError(f"an application named {APP_NAME!r} already runs on the Ray cluster at {address}: "
                         "stop that `qasr serve --ray` (or `serve shutdown`) first")
    try:
        serve.run(application(options, placement), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        log.error("qasr: error: the application did not deploy: %s", _reason(_deployment_message() or str(exc)))
        _remove()
        return 1
    log.info("qasr serve on http://%s:%d through Ray at %s (model %s, replicas %s)", host, port, address,
             options.model, placement.replicas)
    stop.wait()
    log.info("draining (up to %d s) and removing the application", options.drain_seconds)
    _remove()
    return 0


def _remove() -> None:
    """Delete this application; Serve itself (its proxy) too when nothing else runs on it."""
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()


def _check_listening(address: str) -> None:
    """A host:port where nothing listens is one line now (Ray itself would retry for minutes)."""
    found = re.fullmatch(r"([\w.\-]+|\[[0-9a-fA-F:]+\]):(\d+)", address)
    if not found:
        return  # auto, ray://..., or another form Ray resolves itself
    try:
        socket.create_connection((found[1].strip("[]"), int(found[2])), timeout=10).close()
    except OSError as exc:
        raise UsageError(f"nothing answers at {address} ({exc.strerror or exc}): start the cluster with "
                         "`ray start --head`, or give --ray auto on one of its nodes") from None



def _deployment_message() -> str:
    """What Serve says about the deployment (a failed replica's traceback), where it says anything."""
    app_status = serve.status().applications.get(APP_NAME)
    deployment = app_status.deployments.get(APP_NAME) if app_status else None
    return deployment.message if deployment else ""


def _reason(report: str) -> str:
    """The replica's own error from Serve's report: its traceback's last line, less the exception's name."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    return re.sub(r"^[\w.()]*(Error|Exception)[\w()]*: ", "", lines[-1]) if lines else "unknown"
