"""The Ray dashboard's Serve REST API, as far as KubeRay and `llmops scale` use it.

``PUT /api/serve/applications/`` validates the body with Ray's own ``ServeDeploySchema`` and
answers 400 with the validation error, as ray/dashboard/modules/serve/serve_head.py does;
``GET`` answers the applied applications as ``deployed_app_config`` (what
``get_serve_instance_details`` reports for a declaratively deployed app). Every accepted PUT is
kept, so a test sees exactly what was sent.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ray
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

APPLICATIONS_PATH = "/api/serve/applications/"


class FakeServeApi:
    """What the fake dashboard holds: the PUT bodies, in order."""

    def __init__(self) -> None:
        self.puts: list[dict[str, Any]] = []
        self.url = ""

    def details(self) -> dict[str, Any]:
        """The ``GET`` answer: the last applied config's applications."""
        if not self.puts:
            return {"applications": {}}
        last = self.puts[-1]
        return {
            "http_options": {"host": "127.0.0.1", "port": 8000, **last.get("http_options", {})},
            "applications": {
                app["name"]: {"status": "RUNNING", "deployed_app_config": copy.deepcopy(app)}
                for app in last["applications"]
            },
        }


@contextmanager
def fake_serve_api() -> Iterator[FakeServeApi]:
    """Serves the fake API on a loopback port (``FakeServeApi.url``) until the block ends."""
    state = FakeServeApi()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/api/ray/version":
                self._answer(200, {"version": "4", "ray_version": ray.__version__})
            elif self.path == APPLICATIONS_PATH:
                self._answer(200, state.details())
            else:
                self._answer(404, {})

        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            try:
                ServeDeploySchema.model_validate(body)
            except ValidationError as exc:
                self._answer(400, {"error": repr(exc)})
                return
            state.puts.append(body)
            self._answer(200, {})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
