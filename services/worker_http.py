"""A worker's HTTP side: ``GET /metrics`` (Prometheus), ``/health`` (liveness) and ``/ready`` (readiness).

It runs on its own thread from before the engine loads until the process exits, so Kubernetes probes and
Prometheus get answers while the model loads and while the worker drains, without touching the asyncio loop.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

logger = logging.getLogger(__name__)


@dataclass
class WorkerHealth:
    """What /ready reports. Set by the worker's lifecycle; read from the HTTP thread (plain attribute reads)."""

    loaded: bool = False
    registered: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.loaded and self.registered and not self.draining

    def describe(self) -> dict[str, bool]:
        return {"ready": self.ready, "loaded": self.loaded, "registered": self.registered, "draining": self.draining}


class WorkerHttpServer:
    """Serves /metrics, /health and /ready on ``host:port`` (port 0: any free one; see ``port`` once started)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: WorkerHealth) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(registry, health))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="worker-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> WorkerHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(registry: CollectorRegistry, health: WorkerHealth) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[[BaseHTTPRequestHandler], tuple[int, str, bytes]]] = {
        "/metrics": lambda request: _metrics(registry, request),
        "/health": lambda request: (200, "application/json", b'{"status": "ok"}'),
        "/ready": lambda request: _ready(health),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            route = routes.get(self.path.split("?", 1)[0])
            status, content_type, body = route(self) if route else (404, "text/plain", b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - scrapes every few seconds: no access log
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler


def _metrics(registry: CollectorRegistry, request: BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
    encoder, content_type = choose_encoder(request.headers.get("Accept"))
    return 200, content_type, encoder(registry)


def _ready(health: WorkerHealth) -> tuple[int, str, bytes]:
    return (200 if health.ready else 503), "application/json", json.dumps(health.describe()).encode()
