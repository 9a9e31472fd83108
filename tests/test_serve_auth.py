"""The served model answers only token holders, reports metrics, logs each request, speaks https, and stops on
SIGTERM without dropping an accepted request (`visiontune serve` in a real process where it matters)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import visiontune as vt
from conftest import make_image, trained_data

TOKEN = "T-" + "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    vt.fit(trained_data(root, per_class=8), out=root / "run", report=False, img_size=64, epochs=2)
    return root / "run"


def png(colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    make_image(colour, np.random.default_rng(3)).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`visiontune serve RUN ARGS` in its own process, ready once /health answers."""

    def __init__(self, run: Path, *args: str, env: dict | None = None, https: bool = False, verify=None):
        import httpx

        self.port = free_port()
        self.base = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "visiontune", "serve", str(run), "--port", str(self.port), "--device", "cpu", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**{k: v for k, v in os.environ.items() if k != "VISIONTUNE_TOKEN"}, "COLUMNS": "300", **(env or {})})
        self.http = httpx.Client(base_url=self.base, timeout=30, verify=verify if verify is not None else True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("serve did not answer /health in 120 s")

    def predict(self, headers=None):
        return self.http.post("/predict", files={"file": ("red.png", png(), "image/png")}, headers=headers or {})

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        self.http.close()
        return self.process.returncode, out, err


def counter(metrics_text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_a_token_from_the_environment_guards_every_endpoint_but_health(run, tmp_path):
    log = tmp_path / "access.jsonl"
    served = Served(run, "--host", "0.0.0.0", "--access-log", str(log), env={"VISIONTUNE_TOKEN": TOKEN})
    try:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        refused = served.predict()
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert "error" in refused.json() and TOKEN not in refused.text
        for wrong in (f"Bearer {TOKEN}x", "Bearer", f"Bearer {TOKEN} extra", f"Basic {TOKEN}", "bearer", TOKEN, f"Token {TOKEN}"):
            assert served.predict({"Authorization": wrong}).status_code == 401, wrong
        assert served.http.get("/model").status_code == 401 and served.http.get("/metrics").status_code == 401
        assert served.http.get("/health").json() == {"status": "ok"}  # liveness only, no model details
        assert "<input id=\"file\"" in served.http.get("/").text  # the page asks for the token itself
        before = counter(served.http.get("/metrics", headers=bearer).text, "visiontune_requests_total",
                         endpoint="/predict", status="200")
        for _ in range(3):
            answer = served.predict(bearer)
            assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "red"
        metrics = served.http.get("/metrics", headers=bearer)
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert counter(text, "visiontune_requests_total", endpoint="/predict", status="200") == before + 3
        assert counter(text, "visiontune_images_predicted_total") == 3
        assert counter(text, "visiontune_unauthorized_total") >= 10
        assert counter(text, "visiontune_request_seconds_count", endpoint="/predict") >= 3
        assert counter(text, "visiontune_model_load_seconds") > 0
        model = served.http.get("/model", headers=bearer).json()
        assert model["classes"] == ["blue", "green", "red"] and TOKEN not in json.dumps(model)
    finally:
        code, out, err = served.stop()
    assert code == 0, err
    assert f"#token={TOKEN}" in out and "Bearer $VISIONTUNE_TOKEN" in out  # the page URL, and a curl line
    assert TOKEN not in err  # the access log and the server's own lines never carry it
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert TOKEN not in log.read_text()
    assert {"time", "client", "method", "endpoint", "status", "ms", "images"} <= set(lines[0])
    predicted = [r for r in lines if r["endpoint"] == "/predict" and r["status"] == 200]
    assert len(predicted) == 3 and all(r["images"] == 1 for r in predicted)
    assert sum(r["status"] == 401 for r in lines) >= 10


def test_without_a_token_one_is_made_beside_the_run_and_reused(run):
    token_file = run / "serve.token"
    token_file.unlink(missing_ok=True)
    served = Served(run)
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 43  # 32 random bytes, URL-safe base64
        assert served.predict().status_code == 401
        assert served.predict({"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        code, out, _ = served.stop()
    assert code == 0 and f"$(cat {token_file})" in out
    again = Served(run)
    try:
        assert again.predict({"Authorization": f"Bearer {token}"}).status_code == 200  # the same token
    finally:
        again.stop()


def test_no_auth_answers_without_a_header_and_says_so(run):
    served = Served(run, "--no-auth")
    try:
        assert served.predict().status_code == 200 and served.http.get("/model").status_code == 200
    finally:
        code, out, _ = served.stop()
    assert code == 0 and "authentication is OFF" in out


def test_token_sources_and_their_faults(tmp_path):
    from visiontune.errors import UsageError
    from visiontune.serve.auth import Auth, read_token_file, resolve_token

    loose = tmp_path / "loose.token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    with pytest.raises(UsageError, match=f"chmod 600 {loose}"):
        read_token_file(loose)
    with pytest.raises(UsageError, match="not found"):
        read_token_file(tmp_path / "missing.token")
    tight = tmp_path / "tight.token"
    tight.write_text(TOKEN + "\n")
    tight.chmod(0o600)
    auth, notes = resolve_token(tmp_path / "kept.token", tight, environ={})
    assert auth.token == TOKEN and not (tmp_path / "kept.token").exists()
    auth, notes = resolve_token(tmp_path / "kept.token", tight, environ={"VISIONTUNE_TOKEN": "from-env"})
    assert auth.token == "from-env" and "environment wins" in notes[0] and "from-env" not in " ".join(notes)
    tight.write_text("two words\n")
    with pytest.raises(UsageError, match="spaces"):
        read_token_file(tight)
    if os.geteuid() != 0:  # root reads any file
        tight.write_text(TOKEN)
        tight.chmod(0o000)
        with pytest.raises(UsageError, match="chmod 600"):
            read_token_file(tight)
    assert Auth.off().allows(None) and not Auth(TOKEN, "x").allows(None)
    assert not Auth(TOKEN, "x").allows("Bearer " + "\u00e9" * 3)  # non-ASCII header text: False, not an error


def test_the_python_api_asks_for_the_same_choice(run):
    from visiontune.errors import UsageError
    from visiontune.serve.app import create_app

    classifier = vt.load(run)
    with pytest.raises(UsageError, match="no_auth=True"):
        create_app(classifier)
    with pytest.raises(UsageError, match="not both"):
        create_app(classifier, token=TOKEN, no_auth=True)


def test_cors_is_off_unless_an_origin_is_given(run):
    from fastapi.testclient import TestClient

    from visiontune.serve.app import create_app

    classifier = vt.load(run)
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    closed = TestClient(create_app(classifier, token=TOKEN))
    assert "access-control-allow-origin" not in closed.options("/predict", headers=preflight).headers
    opened = TestClient(create_app(classifier, token=TOKEN, cors_origins=("https://app.example",)))
    answer = opened.options("/predict", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
    assert opened.get("/model", headers={"Origin": "https://app.example"}).status_code == 401  # CORS is not auth


def self_signed(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_a_self_signed_certificate_and_clear_refusals(run, tmp_path):
    from conftest import run_cli

    cert, key = self_signed(tmp_path)
    served = Served(run, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), env={"VISIONTUNE_TOKEN": TOKEN},
                    https=True, verify=str(cert))
    try:
        assert served.http.get("/health").status_code == 200
        assert served.predict({"Authorization": f"Bearer {TOKEN}"}).json()["predictions"][0]["label"] == "red"
    finally:
        code, out, _ = served.stop()
    assert code == 0 and f"https://127.0.0.1:{served.port}/#token=" in out
    other_cert, other_key = self_signed(tmp_path, "other")
    port = free_port()
    mismatched = run_cli("serve", str(run), "--port", str(port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(other_key),
                         fresh=True)  # a start-up check: a fresh process, as the user runs it
    assert mismatched.returncode == 2 and "the key must be the certificate's own" in mismatched.stderr
    missing = run_cli("serve", str(run), "--port", str(port), "--ssl-certfile", str(tmp_path / "none.crt"), fresh=True)
    assert missing.returncode == 2 and "none.crt" in missing.stderr + missing.stdout
    with socket.socket() as s:  # neither start bound the port
        s.bind(("127.0.0.1", port))


def test_sigterm_under_load_answers_every_accepted_request_then_exits_0(run, tmp_path):
    """40 requests (16 images each) from 10 concurrent clients, one connection each; SIGTERM once 10 are answered. Every request
    sent before the signal is answered 200 (none cut, none 5xx); those after it are refused at connect (or
    closed before any byte of an answer); the server exits 0."""
    import http.client

    served = Served(run, "--max-concurrent", "1", env={"VISIONTUNE_TOKEN": TOKEN})
    body_boundary = "vtb"
    part = (f"--{body_boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + png() + b"\r\n"
    body = part * 16 + f"--{body_boundary}--\r\n".encode()  # 16 images a request: each takes a while
    headers = {"Content-Type": f"multipart/form-data; boundary={body_boundary}", "Authorization": f"Bearer {TOKEN}",
               "Connection": "close"}
    results: list[tuple[float, float, str]] = []
    answered = threading.Event()
    signalled = {"at": None}
    lock = threading.Lock()

    def one(_: int) -> None:
        sent = time.monotonic()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
            connection.request("POST", "/predict", body, headers)
            response = connection.getresponse()
            outcome = str(response.status)
            response.read()
            connection.close()
        except ConnectionRefusedError:
            outcome = "refused"
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            outcome = "closed before an answer"
        with lock:
            results.append((sent, time.monotonic(), outcome))
            if sum(o == "200" for _, _, o in results) >= 10:
                answered.set()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(one, i) for i in range(40)]
        answered.wait(timeout=120)
        signalled["at"] = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        for f in futures:
            f.result()
    _, err = served.process.communicate(timeout=60)
    assert served.process.returncode == 0, err
    at = signalled["at"]
    before = [o for sent, _, o in results if sent < at - 0.2]
    in_flight = [o for sent, done, o in results if sent < at - 0.2 and done > at]
    after = [o for sent, _, o in results if sent >= at - 0.2]
    assert len(in_flight) >= 3, results  # the drain had accepted requests to finish
    assert before.count("200") == len(before), results  # every request sent before the signal: answered 200
    assert set(after) <= {"200", "refused", "closed before an answer"}, results
    assert any(o != "200" for o in after), results  # the stop really stopped accepting
    assert "Traceback" not in err


def test_the_deploy_guide_snippets_are_valid(tmp_path):
    """docs/deploy.md: the systemd unit's ExecStart is a `visiontune serve` command line this CLI accepts, the
    Prometheus job scrapes with a bearer token, and every `--flag` of serve the guide names exists."""
    import re
    import shlex

    import yaml

    from visiontune.cli import build_parser

    guide = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", guide, re.M).group(1)
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "visiontune" and argv[1] == "serve"
    run = tmp_path / "NAME" / "classifier"
    run.mkdir(parents=True)
    (run / "classifier.json").write_text("{}")
    argv[2] = str(run.parent)
    args = build_parser().parse_args(argv[1:])
    assert args.host == "127.0.0.1" and args.drain_seconds == 30 and not args.no_auth
    job = yaml.safe_load(re.search(r"```yaml\n(.*?)```", guide, re.S).group(1))["scrape_configs"][0]
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"].endswith("serve.token")
    serve_flags = {a for action in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
                   for a in action.option_strings}
    named = set(re.findall(r"(--[a-z][a-z-]+)", guide)) - {"--cacert"}
    assert named <= serve_flags, named - serve_flags
