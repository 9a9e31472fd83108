"""`visiontune serve RUN`: the classifier behind a small HTTP API and one web page (FastAPI + uvicorn).

* ``POST /predict`` — multipart upload (one or more ``file`` fields) or JSON ``{"images": [base64, ...]}``;
  answers ``{"predictions": [{"name", "label", "top": [{"class", "prob"}, ...]}]}``.
* ``GET /health``, ``GET /model`` (architecture, classes, metrics, preprocessing), ``GET /`` (the page).

Limits, all answered with a JSON error and a 4xx code: request size (413), pixel count checked from the
image header before decoding (413), images per request (413), unreadable images (422), and concurrent
predictions (503 once `max_concurrent` are running, so a burst cannot queue unbounded work).
Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from visiontune.version import __version__
from visiontune.classifier import Classifier
from visiontune.data.images import ImageError, decode_rgb
from visiontune.data.transforms import eval_transform

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_IMAGES = 32
MAX_CONCURRENT = 4


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _page() -> str:
    return resources.files("visiontune.serve").joinpath("static/index.html").read_text()


def create_app(
    classifier: Classifier, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
    max_images: int = MAX_IMAGES, max_concurrent: int = MAX_CONCURRENT, topk: int = 5,
) -> FastAPI:
    app = FastAPI(title="visiontune", version=__version__)
    transform = eval_transform(classifier.preprocessing)
    forward = classifier.engine_forward("auto")
    slots = asyncio.Semaphore(max_concurrent)
    k = min(topk, len(classifier.classes))

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
        with torch.inference_mode():
            probs = forward(torch.stack(decoded)).float().softmax(-1).numpy()
        results = []
        for (name, _), row in zip(images, probs):
            top = np.argsort(-row)[:k]
            results.append({"name": name, "label": classifier.classes[top[0]],
                            "top": [{"class": classifier.classes[j], "prob": float(row[j])} for j in top]})
        return results

    async def read_images(request: Request) -> list[tuple[str, bytes]]:
        length = request.headers.get("content-length")
        if length is not None and int(length) > max_upload_bytes:
            raise RequestError(413, f"request of {int(length):,} bytes is over the limit of {max_upload_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise RequestError(413, f"request is over the limit of {max_upload_bytes:,} bytes")
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
                yield bytes(body)

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
        return {"arch": classifier.arch, "classes": classifier.classes, "preprocessing": classifier.preprocessing.to_dict(),
                "metrics": {k: v for k, v in classifier.metrics.items() if not isinstance(v, (dict, list))}}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _page()

    @app.post("/predict")
    async def predict_endpoint(request: Request) -> dict:
        if slots.locked():
            raise RequestError(503, f"busy: {max_concurrent} predictions running; retry shortly")
        async with slots:
            images = await read_images(request)
            return {"predictions": await asyncio.to_thread(predict, images)}

    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    import uvicorn

    app = create_app(Classifier.load(run), **limits)
    uvicorn.run(app, host=host, port=port, log_level="info")
