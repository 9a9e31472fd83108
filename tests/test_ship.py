"""Shipping: export with parity, the README's onnxruntime snippet, int8, engines, Kaggle submissions,
ensembles, the HTTP server (API limits and the page in headless Chromium)."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visiontune as vt

FAST = {"img_size": 64, "epochs": 6}
TOKEN = "test-token-0123456789abcdef"  # the served apps here want it, as `visiontune serve` does by default
BEARER = {"Authorization": f"Bearer {TOKEN}"}
AUTH_LINE = f"Authorization: Bearer {TOKEN}\r\n".encode()
README = Path(__file__).resolve().parent.parent / "README.md"
from conftest import chromium, needs_browser, run_cli as cli, trained_data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship")
    data = trained_data(root)
    vt.fit(data, out=root / "a", report=False, seed=0, **FAST)
    vt.fit(data, out=root / "b", report=False, seed=1, cut="pooled", **FAST)
    return root


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_passes_the_parity_check_and_carries_metadata(runs, fmt):
    result = cli("export", str(runs / "a"), "--format", fmt)
    assert result.returncode == 0, result.stderr
    diff = float(re.search(r"max \|Δprob\| = ([0-9.e+-]+)", result.stderr).group(1))
    assert diff <= 1e-4 and "OK" in result.stderr
    from visiontune.export.formats import load_exported

    path = runs / "a" / "export" / ("model.onnx" if fmt == "onnx" else "model.pt")
    run, meta = load_exported(path)
    assert json.loads(meta["classes"]) == ["blue", "green", "red"]
    assert json.loads(meta["preprocessing"])["input_size"] == 64
    again = cli("export", str(runs / "a"), "--format", fmt)  # a second export takes the next free name
    assert again.returncode == 0 and path.with_name(f"{path.stem}-2{path.suffix}").exists()


def test_readme_onnxruntime_snippet_runs_without_visiontune(runs):
    if not (runs / "a" / "export" / "model.onnx").exists():
        assert cli("export", str(runs / "a")).returncode == 0
    snippet = re.search(r"```python\n(# plain onnxruntime.*?)```", README.read_text(), re.S).group(1)
    image = next((runs / "data" / "red").glob("*.png"))
    namespace = {"MODEL": str(runs / "a" / "export" / "model.onnx"), "IMAGE": str(image)}
    exec(compile(snippet, "README snippet", "exec"), namespace)  # noqa: S102 - our own README's code
    assert namespace["label"] == "red"
    clf = vt.load(runs / "a")
    expected = clf.predict(str(image), topk=3)
    assert namespace["probs"].max() == pytest.approx(expected.probs[0], abs=2e-3)  # PIL vs torchvision resize


def test_int8_quantization_prints_the_accuracy_change(runs, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli("export", str(runs / "a"), "--out", str(out), "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m-int8.onnx").exists()
    found = re.search(r"validation accuracy: fp32 ([0-9.]+) -> int8 ([0-9.]+) \([+-][0-9.]+\)", result.stderr)
    assert found and float(found.group(2)) >= float(found.group(1)) - 0.1  # int8 must stay usable, not just run


def test_export_names_outputs_and_never_leaves_a_broken_file(runs, tmp_path, monkeypatch):
    """--out without a suffix gets one (and int8 works on it); default names never collide; a crash while
    writing leaves no file behind."""
    bare = tmp_path / "export_int8"
    result = cli("export", str(runs / "a"), "--out", str(bare), "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "export_int8.onnx").exists() and (tmp_path / "export_int8-int8.onnx").exists()
    refused = cli("export", str(runs / "a"), "--out", str(bare))
    assert refused.returncode == 2 and "nothing was overwritten" in refused.stderr

    from visiontune.api import export
    from visiontune.export import formats

    first, second = export(runs / "a", "torchscript"), export(runs / "a", "torchscript")  # re-export just works
    assert first.path.name == "model.pt" or first.path.name.startswith("model-")
    assert second.path != first.path and second.path.parent == first.path.parent and second.parity["ok"]

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while quantizing")

    monkeypatch.setattr("onnxruntime.quantization.quantize_static", crash)
    with pytest.raises(RuntimeError):
        export(runs / "a", "onnx", tmp_path / "q.onnx", quantize="int8")
    assert sorted(p.name for p in tmp_path.glob("q*")) == ["q.onnx"]  # the fp32 file is whole; no int8 remains
    assert not list(tmp_path.glob(".*partial*"))
    assert formats.load_exported(tmp_path / "q.onnx")[1]["classes"]


def test_onnx_engine_predicts_what_torch_predicts(runs):
    clf = vt.load(runs / "a")
    images = sorted((runs / "data").rglob("*.png"))[:10]
    _, torch_probs = clf.probabilities(images, engine="torch")
    _, onnx_probs = clf.probabilities(images, engine="onnx")
    assert np.abs(torch_probs - onnx_probs).max() < 1e-4


def test_kaggle_submission_follows_the_sample(runs, tmp_path):
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    images = sorted((runs / "data").rglob("*.png"))[::5]
    for i, path in enumerate(images):
        (test_dir / f"img{i:03d}.png").write_bytes(path.read_bytes())
    ids = [f"img{i:03d}" for i in range(len(images))][::-1]  # the sample's own order
    label_sample = tmp_path / "sample_label.csv"
    label_sample.write_text("id,label\n" + "".join(f"{i},x\n" for i in ids))
    out = tmp_path / "sub_label.csv"
    result = cli("predict", str(runs / "a"), str(test_dir), "--submission", str(label_sample), "--csv", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == ids
    truth = {f"img{i:03d}": p.parent.name for i, p in enumerate(images)}
    assert np.mean([truth[r[0]] == r[1] for r in rows[1:]]) >= 0.8
    prob_sample = tmp_path / "sample_probs.csv"
    prob_sample.write_text("image_id,red,blue,green\n" + "".join(f"{i},0,0,0\n" for i in ids))
    out = tmp_path / "sub_probs.csv"
    assert cli("predict", str(runs / "a"), str(test_dir), "--submission", str(prob_sample), "--csv", str(out)).returncode == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image_id", "red", "blue", "green"]
    assert all(abs(sum(float(v) for v in r[1:]) - 1) < 1e-4 for r in rows[1:])
    missing = tmp_path / "sample_missing.csv"
    missing.write_text("id,label\nnope,x\n")
    bad = cli("predict", str(runs / "a"), str(test_dir), "--submission", str(missing), "--csv", str(tmp_path / "z.csv"))
    assert bad.returncode == 2 and "no image" in bad.stderr


@pytest.mark.parametrize("method", ["mean", "vote", "weighted"])
def test_ensemble_reports_members_correlation_and_saves(runs, tmp_path, method):
    out = tmp_path / f"ens-{method}"
    result = cli("ensemble", str(runs / "a"), str(runs / "b"), "--data", str(runs / "data"), "--method", method, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "correlation" in result.stdout and "ensemble" in result.stdout
    ensemble = vt.load(out)
    assert len(ensemble.members) == 2 and ensemble.method == method
    red = sorted((runs / "data" / "red").glob("*.png"))[:3]
    assert [p.label for p in ensemble.predict(red)] == ["red"] * 3
    result = vt.ensemble_runs([runs / "a", runs / "b"], runs / "data", method=method)
    assert len(result["error_correlation"]) == 2 and result["n"] == 42


# -- the HTTP server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(runs):
    from fastapi.testclient import TestClient

    from visiontune.serve.app import create_app

    app = create_app(vt.load(runs / "a"), token=TOKEN, max_upload_bytes=200_000, max_pixels=500 * 500, max_images=3)
    return TestClient(app, headers=BEARER)


def png_bytes(colour=(200, 40, 40), size=(48, 48)) -> bytes:
    """An image like the training ones (colour + noise + a bright square), PNG-encoded."""
    from conftest import make_image

    image = make_image(colour, np.random.default_rng(7), size=max(size))
    buffer = io.BytesIO()
    image.resize(size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_api_predicts_from_multipart_and_json(client):
    assert client.get("/health").json() == {"status": "ok"}
    model = client.get("/model").json()
    assert model["classes"] == ["blue", "green", "red"] and "accuracy" in model["metrics"]
    answer = client.post("/predict", files={"file": ("red.png", png_bytes(), "image/png")}).json()
    assert answer["predictions"][0]["label"] == "red" and len(answer["predictions"][0]["top"]) == 3
    batch = {"images": [base64.b64encode(png_bytes(c)).decode() for c in ((200, 40, 40), (40, 60, 200))]}
    labels = [p["label"] for p in client.post("/predict", json=batch).json()["predictions"]]
    assert labels == ["red", "blue"]
    assert "<input id=\"file\"" in client.get("/").text


def test_api_limits_answer_json_errors(client):
    too_big = client.post("/predict", content=b"x" * 300_000, headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    flat = io.BytesIO()
    Image.new("RGB", (800, 800), (200, 40, 40)).save(flat, format="PNG")  # small file, too many pixels
    huge = client.post("/predict", files={"file": ("big.png", flat.getvalue(), "image/png")})
    assert huge.status_code == 413 and "pixels" in huge.json()["error"]
    broken = client.post("/predict", files={"file": ("bad.png", b"\x89PNG garbage", "image/png")})
    assert broken.status_code == 422 and "bad.png" in broken.json()["error"]
    assert client.post("/predict", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
    many = {"images": [base64.b64encode(png_bytes()).decode()] * 4}
    assert client.post("/predict", json=many).status_code == 413
    assert client.post("/predict", json={"wrong": 1}).status_code == 422


def test_api_refuses_work_beyond_its_concurrency(runs):
    from fastapi.testclient import TestClient

    from visiontune.serve.app import create_app

    busy = TestClient(create_app(vt.load(runs / "a"), no_auth=True, max_concurrent=0, queue_timeout=0.2))
    response = busy.post("/predict", files={"file": ("red.png", png_bytes(), "image/png")})
    assert response.status_code == 503 and "busy" in response.json()["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(run: Path, **limits):
    """A real uvicorn server (the one `visiontune serve` starts) in a thread; yields its port."""
    import uvicorn

    from visiontune.serve.app import ServeLimits, create_app, server_config

    settings = ServeLimits(**limits)
    port = free_port()
    app = create_app(vt.load(run), settings, token=TOKEN)
    server = uvicorn.Server(server_config(app, settings, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> socket.socket:
    """A socket that has sent `head` (request line + headers, CRLF-terminated) and `body`, and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head + b"\r\n" + body)
    return sock


def status_of(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    return int(answer.split(b" ")[1])


def post_png(port: int, colour=(200, 40, 40)) -> tuple[int, dict]:
    import http.client

    boundary = "vtboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png_bytes(colour) + f"\r\n--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}", **BEARER})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_slow_uploads_hold_connections_not_prediction_slots(runs):
    """Three clients start a 50 kB upload and go silent; with one prediction slot, a normal client is still
    answered at once, and each silent client gets 408 once its body has stalled for body_timeout."""
    with live_server(runs / "a", max_concurrent=1, body_timeout=2.0) as port:
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + AUTH_LINE + b"Content-Length: 50000\r\n")
        stalled = [raw_request(port, head, b'{"images": ["') for _ in range(3)]
        time.sleep(0.3)
        started = time.monotonic()
        status, answer = post_png(port)
        assert status == 200 and answer["predictions"][0]["label"] == "red"
        assert time.monotonic() - started < 1.5  # answered while the stalled uploads wait, not after them
        assert [status_of(sock) for sock in stalled] == [408, 408, 408]


def test_malformed_or_oversized_content_length_is_a_client_error(runs):
    with live_server(runs / "a", max_upload_bytes=100_000) as port:
        for length in (b"abc", b"-5", b"12, 13", b"1e3"):
            sock = raw_request(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + AUTH_LINE
                               + b"Content-Length: " + length + b"\r\n", b"{}")
            assert 400 <= status_of(sock) < 500, length
        sock = raw_request(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + AUTH_LINE
                           + b"Content-Length: 99999999999\r\n", b"{}")
        assert status_of(sock) == 413
        assert post_png(port)[0] == 200  # and the server still answers


@needs_browser
def test_page_in_headless_chromium_shows_the_predicted_class(runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "mine.png"
    image.write_bytes(png_bytes((40, 60, 200)))
    with live_server(runs / "a") as port:
        driver = chromium(tmp_path / "chrome")
        try:
            driver.get(f"http://127.0.0.1:{port}/#token={TOKEN}")  # the URL `visiontune serve` prints
            assert "token" not in driver.current_url  # taken out of the address bar
            driver.find_element(By.ID, "file").send_keys(str(image))
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "label").text != "")
            assert driver.find_element(By.ID, "label").text == "blue"
            assert len(driver.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 3
            assert "3 classes" in driver.find_element(By.ID, "model").text
            assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            driver.save_screenshot(str(runs / "serve-page.png"))
        finally:
            driver.quit()


def test_int8_keeps_the_fast_scheme_only_when_it_barely_moves_the_probabilities(runs, tmp_path, monkeypatch):
    """The schemes are tried in order (u8s8, s8s8, s8s8 with 7-bit weights) until one's probabilities stay within
    MAX_INT8_SHIFT of fp32's on the training images; else the one moving least is kept — calibrated on training
    images, never on the validation images whose accuracy is printed."""
    from visiontune import api
    from visiontune.export import formats

    from visiontune.runs import RunDir

    calibrated = []
    real = formats._quantize

    def quantize(onnx_path, out, batches, scheme):
        calibrated.append(sum(len(b) for b in batches))
        return real(onnx_path, out, batches, scheme)

    monkeypatch.setattr(formats, "_quantize", quantize)
    strict = api.export(runs / "a", out=tmp_path / "strict.onnx", quantize="int8")
    q = strict.quantization
    schemes = list(formats.INT8_SCHEMES)
    within = [k for k, scheme in enumerate(schemes) if q["shift"].get(scheme, float("inf")) <= q["limit"]]
    assert list(q["shift"]) == schemes[: (within[0] if within else len(schemes) - 1) + 1]
    assert q["scheme"] == min(q["shift"], key=q["shift"].get)
    split = RunDir(runs / "a").read_split()
    assert q["calibration_images"] == len(split.train) and set(calibrated) == {len(split.train)}
    monkeypatch.setattr(formats, "MAX_INT8_SHIFT", 10.0)  # anything passes: the fast scheme, tried alone
    lenient = api.export(runs / "a", out=tmp_path / "lenient.onnx", quantize="int8").quantization
    assert lenient["scheme"] == "u8s8" and list(lenient["shift"]) == ["u8s8"]
    monkeypatch.setattr(formats, "MAX_INT8_SHIFT", -1.0)  # nothing passes: every scheme tried, the least moving kept
    harsh = api.export(runs / "a", out=tmp_path / "harsh.onnx", quantize="int8").quantization
    assert list(harsh["shift"]) == schemes and harsh["scheme"] == min(harsh["shift"], key=harsh["shift"].get)
    assert not list(tmp_path.glob(".*partial*"))


def test_concurrent_requests_share_one_forward():
    """The batcher (serve/batching.py) on its own: requests arriving together go through one forward and each
    gets its own rows; an error reaches every request of its batch."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from visiontune.serve.batching import ForwardBatcher

    calls = []

    def run(images):
        calls.append(len(images))
        time.sleep(0.02)
        return images.sum(dim=1).numpy()

    batcher = ForwardBatcher(run, window_s=0.05)
    inputs = [torch.full((1 + i % 2, 3), float(i)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(batcher, inputs))
    for x, rows in zip(inputs, answers):
        assert np.allclose(rows, x.sum(dim=1).numpy())  # each request its own rows, in order
    assert len(calls) < 8 and sum(calls) == sum(len(x) for x in inputs) and max(batcher.batches) > 1

    def broken(images):
        raise ValueError("model failed")

    failing = ForwardBatcher(broken, window_s=0.02)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(failing, x) for x in inputs[:3]]
    assert all(isinstance(f.exception(), ValueError) for f in futures)


def test_the_live_server_batches_concurrent_clients(runs):
    """The same path `visiontune serve` runs (--device cpu here): concurrent clients, every answer right,
    and some forwards carried several requests."""
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from visiontune.serve.app import ServeLimits, create_app, server_config

    settings = ServeLimits(max_concurrent=8)
    app = create_app(vt.load(runs / "a"), settings, token=TOKEN)
    port = free_port()
    server = uvicorn.Server(server_config(app, settings, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post_png(port), range(24)))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert all(status == 200 and body["predictions"][0]["label"] == "red" for status, body in answers)
    assert sum(app.state.batcher.batches) == 24 and max(app.state.batcher.batches) > 1
