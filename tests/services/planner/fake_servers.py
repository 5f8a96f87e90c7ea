"""Small real HTTP servers on 127.0.0.1 for the planner's tests: canned GET answers, and the apps/v1 scale
subresource of Deployments (no Kubernetes API server can be installed on the test machines)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/(scale|status)$")
# What GET paths answer: path -> callable(query) -> (status, content type, body)
Routes = dict[str, Callable[[dict[str, list[str]]], tuple[int, str, str]]]


@contextmanager
def serve(handler_cls: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run `handler_cls` on a free port of 127.0.0.1; yields the base URL; stops on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def routes_handler(routes: Routes) -> type[BaseHTTPRequestHandler]:
    """GET answers from `routes` (404 for any other path); every request path is recorded in ``.seen``."""

    class Handler(_Quiet):
        seen: list[str] = []

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            Handler.seen.append(self.path)
            answer = routes.get(url.path)
            self.reply(*(answer(parse_qs(url.query)) if answer else (404, "text/plain", "not found")))

        do_POST = do_GET

    return Handler


class FakeScaleApi:
    """Deployments' spec.replicas by (namespace, name), served as autoscaling/v1 Scale objects; PATCH sets them.
    GET .../status answers the Deployment with status.availableReplicas from `available` (default: all of them)."""

    def __init__(self, replicas: dict[tuple[str, str], int]) -> None:
        self.replicas = dict(replicas)
        self.available: dict[tuple[str, str], int] = {}
        self.patches: list[tuple[str, str, str, dict]] = []  # (namespace, name, content type, body)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                self.answer(None)

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.answer(body)

            def answer(self, patch: dict | None) -> None:
                match = SCALE_PATH.match(urlsplit(self.path).path)
                key = match.groups()[:2] if match else None
                if key not in api.replicas:
                    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                              "code": 404, "message": f'deployments.apps "{key and key[1]}" not found'}
                    self.reply(404, "application/json", json.dumps(status))
                    return
                if patch is not None:
                    api.patches.append((*key, self.headers["Content-Type"], patch))
                    api.replicas[key] = patch["spec"]["replicas"]
                body = api.scale_object(*key) if match.group(3) == "scale" else api.deployment(*key)
                self.reply(200, "application/json", json.dumps(body))

        return Handler

    def scale_object(self, namespace: str, name: str) -> dict:
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": self.replicas[(namespace, name)]},
                "status": {"replicas": self.replicas[(namespace, name)], "selector": f"app={name}"}}

    def deployment(self, namespace: str, name: str) -> dict:
        labels, replicas = {"app": name}, self.replicas[(namespace, name)]
        return {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": {"containers": []}}},
                "status": {"replicas": replicas, "availableReplicas": self.available.get((namespace, name), replicas)}}
