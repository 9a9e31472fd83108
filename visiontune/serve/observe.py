"""What wraps every request of the server: the token check, the Prometheus metrics, the access log.

One ASGI layer (not Starlette's BaseHTTPMiddleware: that one buffers the body it passes on, and the
server's own body reader must see the upload as it streams in, to answer stalls with 408). For each
request it

1. refuses a non-public endpoint without the bearer token: 401 JSON with ``WWW-Authenticate: Bearer``
   (serve/auth.py decides; the body names no token);
2. counts it in the app's own Prometheus registry (`prometheus_client`, so two apps in one process never
   share counters): requests by endpoint and status, latency, requests in flight, images predicted,
   503 rejections, 401 refusals, the model's load seconds; ``GET /metrics`` (token required) renders them;
3. writes one JSON line (time, client, method, endpoint, status, milliseconds, images) — never a header,
   a query string or image bytes, so neither the token nor the data reaches the log.

Endpoints are labelled by route, with anything unknown as ``other``: random paths from a scanner must not
grow the metrics without bound.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from visiontune.serve.auth import PUBLIC_PATHS, Auth

#: Routes labelled by name in the metrics and the log.
ROUTES = frozenset({"/", "/health", "/model", "/predict", "/metrics", "/docs", "/openapi.json", "/favicon.ico"})
#: Latency buckets (seconds): a cached CPU prediction takes ~10 ms, a 32-image upload on 2 cores ~1 s.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The server's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("visiontune_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("visiontune_request_seconds", "Time to answer a request", ["endpoint"],
                                 buckets=BUCKETS, registry=r)
        self.in_flight = Gauge("visiontune_requests_in_flight", "Requests being answered now", registry=r)
        self.images = Counter("visiontune_images_predicted", "Images the model predicted", registry=r)
        self.busy = Counter("visiontune_busy_rejections", "Requests refused with 503 (no prediction slot)", registry=r)
        self.unauthorized = Counter("visiontune_unauthorized", "Requests refused with 401 (no or wrong token)", registry=r)
        self.model_load = Gauge("visiontune_model_load_seconds", "Seconds it took to load and prepare the model", registry=r)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class AccessLog:
    """One JSON line per request, to a stream (stderr) or appended to a file; safe across worker threads."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()

    @classmethod
    def to_file(cls, path: str) -> AccessLog:
        from visiontune.errors import UsageError

        try:
            return cls(open(path, "a", encoding="utf-8", buffering=1))  # noqa: SIM115  (the server's lifetime)
        except OSError as exc:
            raise UsageError(f"{path}: cannot open the access log ({exc.strerror}); give a file you can write") from None

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def endpoint_of(path: str) -> str:
    return path if path in ROUTES else "other"


class Observe:
    """The ASGI layer (see the module's docstring). The predict endpoint reports how many images it
    predicted by setting ``scope["state"]["images"]`` (Starlette's ``request.state.images``)."""

    def __init__(self, app, auth: Auth, metrics: ServerMetrics, log: AccessLog | None):
        self.app, self.auth, self.metrics, self.log = app, auth, metrics, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        endpoint = endpoint_of(path)
        scope.setdefault("state", {})
        status = {"code": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if path not in PUBLIC_PATHS and not self.auth.allows(_header(scope, b"authorization")):
                self.metrics.unauthorized.inc()
                refusal = JSONResponse({"error": "this server needs `Authorization: Bearer <token>`; the token is in "
                                                 "the file `visiontune serve` printed, or in $VISIONTUNE_TOKEN"},
                                       status_code=401, headers={"WWW-Authenticate": 'Bearer realm="visiontune"'})
                await refusal(scope, receive, send_and_note)
            elif path == "/metrics" and scope.get("method") == "GET":
                await self.metrics.render()(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - started
            code = status["code"]
            images = int(scope["state"].get("images", 0)) if code == 200 else 0
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(code)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if images:
                self.metrics.images.inc(images)
            if code == 503:
                self.metrics.busy.inc()
            if self.log is not None:
                client = scope.get("client") or ("", 0)
                self.log.write({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "client": client[0],
                                "method": scope.get("method", ""), "endpoint": endpoint, "status": code,
                                "ms": round(seconds * 1000, 1), "images": images})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
