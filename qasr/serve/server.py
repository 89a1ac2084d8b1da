"""Running the server: logging, the exposure warning, uvicorn with a bounded drain on SIGTERM."""

from __future__ import annotations

import logging
import sys

import uvicorn

from qasr.serve.app import create_app
from qasr.serve.service import Options, Service

log = logging.getLogger("qasr.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def announce(options: Options, host: str) -> None:
    """Log lines to stderr, and the warning when a keyless server listens beyond loopback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if host not in LOOPBACK and not options.api_key:
        log.warning("warning: serving on %s without --api-key: anyone who can reach this port can use the model",
                    host)


def serve(options: Options, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests get --drain-seconds to finish. 1 when loading failed."""
    announce(options, host)
    service = Service(options)
    config = uvicorn.Config(create_app(service), host=host, port=port, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=options.drain_seconds, ws_max_size=4 * 1024 * 1024)
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    service.on_failure = stop
    log.info("qasr serve on http://%s:%d (model %s)", host, port, options.model)
    server.run()
    return 1 if service.state == "failed" else 0
