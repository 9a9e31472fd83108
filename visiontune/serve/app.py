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
from visiontune.serve.batching import ForwardBatcher

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


def create_app(classifier: Classifier, limits: ServeLimits | None = None, topk: int = 5, **overrides) -> FastAPI:
    """The app; `overrides` are `ServeLimits` fields (`create_app(c, max_images=3)`)."""
    limits = limits or ServeLimits(**overrides)
    max_upload_bytes, max_pixels, max_images, max_concurrent = (
        limits.max_upload_bytes, limits.max_pixels, limits.max_images, limits.max_concurrent)
    app = FastAPI(title="visiontune", version=__version__)
    transform = eval_transform(classifier.preprocessing)
    classifier.engine_forward("auto")  # exported (onnxruntime) before the first request, not during it
    slots = asyncio.Semaphore(max_concurrent)
    # concurrent requests' images share one forward (serve/batching.py)
    batcher = app.state.batcher = ForwardBatcher(lambda images: classifier.tensor_probabilities(images, engine="auto"))

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
            return {"predictions": await asyncio.to_thread(predict, images)}
        finally:
            slots.release()

    return app


def server_config(app: FastAPI, limits: ServeLimits, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info"):
    """uvicorn's config with the connection cap and idle timeout taken from `limits`."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=limits.max_connections,
                          timeout_keep_alive=5)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", **limits) -> None:
    """Serve the classifier of `run`, its forward passes on `device` (--device)."""
    import uvicorn

    from visiontune import device as devices

    classifier = Classifier.load(run)
    classifier.device = devices.choose(device)
    if limits.get("max_concurrent") is None:  # a GPU batches the requests it holds: let it hold more
        limits["max_concurrent"] = GPU_CONCURRENT if classifier.device.accelerated else MAX_CONCURRENT
    settings = ServeLimits(**limits)
    uvicorn.Server(server_config(create_app(classifier, settings), settings, host, port)).run()
