"""`visiontune serve RUN`: the classifier behind a small HTTP API and one web page (FastAPI + uvicorn).

* ``POST /predict`` — multipart upload (one or more ``file`` fields) or JSON ``{"images": [base64, ...]}``;
  answers ``{"predictions": [{"name", "label", "top": [{"class", "prob"}, ...]}]}``, plus ``"tags"`` (every
  class over its tuned threshold) from a multi-label classifier. Probabilities come from the classifier's
  own inference path (:meth:`Classifier.tensor_probabilities`: its engine, its task's activation).
* ``GET /health``, ``GET /model`` (architecture, task, classes, metrics, preprocessing, a multi-label
  classifier's thresholds), ``GET /`` (the page).

Limits (`ServeLimits`), all answered with a JSON error: request size (413, from `Content-Length` before
any byte is read, then counted while reading), a malformed `Content-Length` (400), a body that stalls
(408 after `body_timeout` seconds without a byte, or `body_deadline` seconds in all: slow-loris clients
cannot hold the server), pixel count checked from the image header before decoding (413), images per
request (413), unreadable images (422), and concurrent predictions: at most `max_concurrent` requests
decode and predict at once; the others wait for a slot up to `queue_timeout` seconds, then get 503. The body is read *before* a prediction
slot is taken: slow uploads hold a connection, never a slot, so other clients keep being answered; open
connections are capped by uvicorn's `limit_concurrency` (`max_connections`, 503 beyond it), which bounds
memory at about `max_connections` x `max_upload_bytes`. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import signal
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from visiontune.version import __version__
from visiontune.classifier import Classifier
from visiontune.data.images import ImageError, decode_rgb
from visiontune.data.transforms import eval_transform
from visiontune.errors import UsageError
from visiontune.serve.auth import Auth
from visiontune.serve.batching import ForwardBatcher
from visiontune.serve.observe import AccessLog, Observe, ServerMetrics

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_IMAGES = 32
MAX_CONCURRENT = 4
GPU_CONCURRENT = 32  # on a GPU: requests decoded at once, whose images one batched forward then takes


@dataclass(frozen=True)
class ServeLimits:
    """What one client may cost the server. Defaults: a 10 MB upload is a large phone photo several times over;
    40 MP covers any camera and refuses decompression bombs; 4 predictions at once keep 2-8 cores busy without
    oversubscribing; a request waits up to 30 s for one (a burst is answered late rather than refused; the
    queue is bounded by the connection cap); 10 s without a byte is far beyond any live connection's gap, 60 s in all lets 10 MB through a
    slow (~1.5 Mbit/s) uplink; 64 open connections x 10 MB bounds the bodies held in memory at 640 MB."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS
    max_images: int = MAX_IMAGES
    max_concurrent: int = MAX_CONCURRENT
    queue_timeout: float = 30.0
    body_timeout: float = 10.0
    body_deadline: float = 60.0
    max_connections: int = 64


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _page() -> str:
    return resources.files("visiontune.serve").joinpath("static/index.html").read_text()


def create_app(classifier: Classifier, limits: ServeLimits | None = None, topk: int = 5, *, token: str | None = None,
               no_auth: bool = False, access_log: AccessLog | None = None, cors_origins: tuple[str, ...] = (),
               load_seconds: float = 0.0, **overrides) -> FastAPI:
    """The app; `overrides` are `ServeLimits` fields (`create_app(c, max_images=3)`).

    Who may call it is the caller's explicit choice, as on the command line: `token=` (every endpoint but
    /health and the page wants `Authorization: Bearer <token>`) or `no_auth=True`; neither is refused.
    `access_log` gets one JSON line per request; `cors_origins` are the pages served elsewhere that may call
    it (CORS stays off without them); `load_seconds` is how long loading the model took (a metric)."""
    started = time.perf_counter()
    auth = _auth_choice(token, no_auth)
    limits = limits or ServeLimits(**overrides)
    max_upload_bytes, max_pixels, max_images, max_concurrent = (
        limits.max_upload_bytes, limits.max_pixels, limits.max_images, limits.max_concurrent)
    app = FastAPI(title="visiontune", version=__version__)
    transform = eval_transform(classifier.preprocessing)
    classifier.engine_forward("auto")  # exported (onnxruntime) before the first request, not during it
    slots = asyncio.Semaphore(max_concurrent)
    # concurrent requests' images share one forward (serve/batching.py)
    batcher = app.state.batcher = ForwardBatcher(lambda images: classifier.tensor_probabilities(images, engine="auto"))

    metrics = app.state.metrics = ServerMetrics()
    app.add_middleware(Observe, auth=auth, metrics=metrics, log=access_log)
    if cors_origins:  # outermost: a browser's preflight carries no token and must be answered by CORS itself
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def predict(images: list[tuple[str, bytes]]) -> list[dict]:
        decoded = []
        for name, data in images:
            try:
                decoded.append(transform(decode_rgb(data, name, max_pixels)))
            except ImageError as err:
                status = 413 if "pixels" in err.reason else 422
                raise RequestError(status, f"{name}: {err.reason}") from None
        probs = batcher(torch.stack(decoded))
        results = []
        for found in classifier.predictions_of([name for name, _ in images], probs, topk):
            result = {"name": found.path, "label": found.label,
                      "top": [{"class": c, "prob": p} for c, p in zip(found.classes, found.probs)]}
            if found.tags is not None:
                result["tags"] = found.tags
            results.append(result)
        return results

    async def read_body(request: Request) -> bytes:
        """The whole body, or a RequestError: over the size limit, or stalled (slow-loris)."""
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise RequestError(400, f"Content-Length {length[:40]!r} is not a byte count")
            if int(length) > max_upload_bytes:
                raise RequestError(413, f"request of {int(length):,} bytes is over the limit of {max_upload_bytes:,}")
        body = bytearray()
        chunks = request.stream().__aiter__()
        deadline = time.monotonic() + limits.body_deadline
        while True:
            wait = min(limits.body_timeout, deadline - time.monotonic())
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), timeout=max(wait, 0.0))
            except StopAsyncIteration:
                return bytes(body)
            except asyncio.TimeoutError:
                raise RequestError(408, f"request body stalled: {len(body):,} bytes in, none for {wait:.0f} s "
                                        "(or over the time limit for one upload)") from None
            body += chunk
            if len(body) > max_upload_bytes:
                raise RequestError(413, f"request is over the limit of {max_upload_bytes:,} bytes")

    async def read_images(request: Request) -> list[tuple[str, bytes]]:
        body = await read_body(request)
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            import json

            try:
                items = json.loads(body)["images"]
                images = [(f"image{i}", base64.b64decode(item, validate=True)) for i, item in enumerate(items)]
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise RequestError(422, 'JSON must be {"images": [base64 strings]}') from None
        elif kind.startswith("multipart/form-data"):
            from starlette.datastructures import UploadFile
            from starlette.formparsers import MultiPartParser

            async def replay():
                yield body

            try:
                form = await MultiPartParser(request.headers, replay(), max_files=max_images + 1).parse()
            except Exception as exc:  # malformed multipart bodies raise parser-specific errors
                raise RequestError(422, f"cannot read the multipart body: {exc}") from None
            images = [(f.filename or "upload", await f.read()) for _, f in form.multi_items() if isinstance(f, UploadFile)]
        else:
            raise RequestError(415, "send multipart/form-data with file fields, or JSON {\"images\": [base64]}")
        if not images:
            raise RequestError(422, "no image in the request")
        if len(images) > max_images:
            raise RequestError(413, f"{len(images)} images is over the limit of {max_images} per request")
        return images

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict:
        task = classifier.task
        return {"arch": classifier.arch, "task": task.name, "classes": classifier.classes,
                "preprocessing": classifier.preprocessing.to_dict(),
                "metrics": {k: v for k, v in classifier.metrics.items() if not isinstance(v, (dict, list))},
                **task.exported_decisions(classifier.extra, len(classifier.classes))}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _page()

    @app.post("/predict")
    async def predict_endpoint(request: Request) -> dict:
        images = await read_images(request)  # before a slot: a slow upload must not hold one
        try:
            await asyncio.wait_for(slots.acquire(), timeout=limits.queue_timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"busy: {max_concurrent} predictions running and no slot free for "
                                    f"{limits.queue_timeout:g} s; retry shortly") from None
        try:
            answer = {"predictions": await asyncio.to_thread(predict, images)}
            request.state.images = len(images)  # counted by the metrics and the access log
            return answer
        finally:
            slots.release()

    metrics.model_load.set(load_seconds + time.perf_counter() - started)
    return app


def _auth_choice(token: str | None, no_auth: bool) -> Auth:
    if no_auth and token is not None:
        raise UsageError("give a token or no_auth=True, not both")
    if no_auth:
        return Auth.off()
    if token is None:
        raise UsageError("create_app needs token=... (callers must send `Authorization: Bearer <token>`) or "
                         "no_auth=True (anyone who reaches the port may call it)")
    return Auth.with_token(token)


#: How long a stop waits for accepted requests (a 32-image CPU prediction takes ~1-2 s; 30 s covers a queue).
DRAIN_SECONDS = 30.0


@dataclass(frozen=True)
class Tls:
    """A certificate and its key for https, checked before the port is bound (`check`)."""

    certfile: str | None = None
    keyfile: str | None = None

    def check(self) -> None:
        import ssl

        if self.certfile is None and self.keyfile is None:
            return
        if self.certfile is None:
            raise UsageError("--ssl-keyfile needs --ssl-certfile (the certificate the key belongs to)")
        for flag, path in (("--ssl-certfile", self.certfile), ("--ssl-keyfile", self.keyfile)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{flag} {path}: no such file; give the PEM file's path")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.certfile, self.keyfile)
        except ssl.SSLError as exc:
            raise UsageError(f"{self.certfile} / {self.keyfile or '(key in the certificate file)'}: cannot be used for "
                             f"https ({exc.reason or exc}); the key must be the certificate's own, both in PEM") from None
        except OSError as exc:
            raise UsageError(f"{self.certfile}: cannot be read ({exc.strerror}); check the path and its permissions") from None


def server_config(app: FastAPI, limits: ServeLimits, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info", tls: Tls | None = None, drain_seconds: float = DRAIN_SECONDS):
    """uvicorn's config with the connection cap and idle timeout taken from `limits`, TLS when given, and
    at most `drain_seconds` for the requests already accepted when a stop is asked for."""
    import uvicorn

    tls = tls or Tls()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=limits.max_connections,
                          timeout_keep_alive=5, timeout_graceful_shutdown=max(1, round(drain_seconds)),
                          ssl_certfile=tls.certfile, ssl_keyfile=tls.keyfile, access_log=False)


def draining_server(config):
    """A uvicorn server whose SIGTERM / Ctrl-C is a polite stop that ends the process with exit 0.

    uvicorn already stops accepting, lets accepted requests finish (up to `timeout_graceful_shutdown`) and
    closes; but then it raises the caught signal again, so the process dies by it (exit 143 for SIGTERM),
    which a supervisor reads as a crash. Here the signal is only noted. A second Ctrl-C still forces the exit."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return DrainingServer(config)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", *,
          token_file: str | Path | None = None, no_auth: bool = False, tls: Tls | None = None,
          access_log: str | None = None, cors_origins: tuple[str, ...] = (), drain_seconds: float = DRAIN_SECONDS,
          say=print, **limits) -> None:
    """Serve the classifier of `run`, its forward passes on `device` (--device), behind a bearer token unless
    `no_auth` (serve/auth.py: $VISIONTUNE_TOKEN, `token_file`, else RUN/serve.token made once). `say` gets the
    lines to show the user (how to call it; never the token except in the page URL and curl line printed
    for the user alone)."""
    from visiontune import device as devices
    from visiontune.runs import RunDir
    from visiontune.serve.auth import resolve_token

    tls = tls or Tls()
    tls.check()  # a wrong certificate or key stops here, before the model loads or the port is bound
    auth, notes = resolve_token(RunDir.holding(run).serve_token, token_file, no_auth)
    started = time.perf_counter()
    classifier = Classifier.load(run)
    classifier.device = devices.choose(device)
    if limits.get("max_concurrent") is None:  # a GPU batches the requests it holds: let it hold more
        limits["max_concurrent"] = GPU_CONCURRENT if classifier.device.accelerated else MAX_CONCURRENT
    settings = ServeLimits(**limits)
    log = AccessLog.to_file(access_log) if access_log else AccessLog()
    app = create_app(classifier, settings, token=auth.token, no_auth=not auth.required, access_log=log,
                     cors_origins=tuple(cors_origins), load_seconds=time.perf_counter() - started)
    for line in notes + calling_lines(auth, host, port, tls.certfile):
        say(line)
    draining_server(server_config(app, settings, host, port, tls=tls, drain_seconds=drain_seconds)).run()


def calling_lines(auth: Auth, host: str, port: int, certfile: str | None = None) -> list[str]:
    """How to call the server: the page URL (the token in its fragment, which browsers never send, as Jupyter
    prints its own) and a curl line."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"{'https' if certfile else 'http'}://{'[' + shown + ']' if ':' in shown else shown}:{port}"
    # the curl line names where the token is, not the token: terminal logs and shell history keep no copy
    where = "$VISIONTUNE_TOKEN" if auth.origin.startswith("$") else f"$(cat {auth.origin})"
    header = f' -H "Authorization: Bearer {where}"' if auth.required else ""
    page = f"{base}/#token={auth.token}" if auth.required else f"{base}/"
    lines = [f"page: {page}", f"call: curl{header} -F file=@photo.jpg {base}/predict"]
    if certfile:
        lines.append(f"(a self-signed certificate: add --cacert {certfile} to curl)")
    return lines
