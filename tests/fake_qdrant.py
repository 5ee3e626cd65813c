"""A stand-in Qdrant server for fault tests: the REST calls our server adapter makes, answered
by qdrant-client's in-memory engine, on a port the test can close and reopen.

Not a Qdrant: only the endpoints ``streams.stores.server`` uses, with Qdrant's request and
response shapes (validated and produced by qdrant-client's own models), so that the
worker's real HTTP client, retries and all, talks to it as to a server. Its data lives in
the test process and outlives an outage.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qdrant_client import QdrantClient, models

ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/$"), "version"),
    ("GET", re.compile(r"^/collections/([^/]+)/exists$"), "exists"),
    ("GET", re.compile(r"^/collections/([^/]+)$"), "info"),
    ("PUT", re.compile(r"^/collections/([^/]+)$"), "create"),
    ("DELETE", re.compile(r"^/collections/([^/]+)$"), "drop"),
    ("PUT", re.compile(r"^/collections/([^/]+)/points$"), "upsert"),
    ("POST", re.compile(r"^/collections/([^/]+)/points/delete$"), "delete"),
    ("POST", re.compile(r"^/collections/([^/]+)/points$"), "retrieve"),
    ("POST", re.compile(r"^/collections/([^/]+)/points/query/batch$"), "query_batch"),
]


class FakeQdrant:
    """``api_key``: requests without it in their ``api-key`` header are refused (401), as Qdrant does;
    ``tls``: the server's side of TLS (https only)."""

    def __init__(self, port: int, *, api_key: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.api_key = api_key
        self.tls = tls
        self.engine = QdrantClient(location=":memory:")
        self.lock = threading.Lock()  # the in-memory engine is not meant for concurrent writers
        self.requests = 0
        self.refused = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                if fake.api_key is not None and self.headers.get("api-key") != fake.api_key:
                    with fake.lock:
                        fake.refused += 1
                    self.send_error(401, "Unauthorized", "Must provide an API key or an Authorization bearer token")
                    return
                for method, pattern, action in ROUTES:
                    match = pattern.match(path)
                    if method == self.command and match:
                        with fake.lock:
                            fake.requests += 1
                            result = fake.answer(action, match.groups(), body)
                        # The root answers bare version info; every other endpoint wraps its result.
                        wrapped = result if action == "version" else {"result": result, "status": "ok", "time": 0.0}
                        payload = json.dumps(wrapped).encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                self.send_error(404, f"no fake for {self.command} {path}")

            do_GET = do_PUT = do_POST = do_DELETE = _handle  # noqa: N815 - the names http.server dispatches to

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """An outage: the port refuses connections until ``start``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, action: str, groups: tuple[str, ...], body: dict[str, Any]) -> Any:
        engine = self.engine
        name = groups[0] if groups else ""
        if action == "version":
            return {"title": "fake qdrant", "version": "1.20.0"}
        if action == "exists":
            return {"exists": engine.collection_exists(name)}
        if action == "info":
            return engine.get_collection(name).model_dump(mode="json")
        if action == "create":
            request = models.CreateCollection.model_validate(body)
            return engine.create_collection(name, vectors_config=request.vectors)
        if action == "drop":
            return engine.delete_collection(name)
        if action == "upsert":
            batch = models.PointsList.model_validate(body)
            return engine.upsert(name, points=batch.points).model_dump(mode="json")
        if action == "delete":
            selector = models.PointIdsList.model_validate(body)
            return engine.delete(name, points_selector=selector).model_dump(mode="json")
        if action == "retrieve":
            request = models.PointRequest.model_validate(body)
            records = engine.retrieve(
                name, ids=request.ids, with_payload=request.with_payload, with_vectors=request.with_vector
            )
            return [r.model_dump(mode="json") for r in records]
        if action == "query_batch":
            batch_request = models.QueryRequestBatch.model_validate(body)
            responses = engine.query_batch_points(name, requests=batch_request.searches)
            return [r.model_dump(mode="json") for r in responses]
        raise AssertionError(action)
