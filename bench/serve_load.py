"""Load test of `visiontune serve` with hostile clients mixed in — issue G's server bench.

The server runs as the CLI starts it (`visiontune serve`, default limits, a lite0 classifier at 224 px with a
10-class head, in its own process). For `--seconds` (default 60) `--clients` threads (default 16) send, each
in a loop, a fixed mix of requests:

* good (70 %): one Fashion-MNIST PNG, multipart — must answer 200 with a prediction;
* broken image (10 %): PNG header + garbage — 422;
* pixel bomb (5 %): a 10,000 x 10,000 PNG of 100 kB — 413 from the header, never decoded;
* over the upload limit (5 %): `Content-Length` of 11 MB, only the first 64 kB sent — 413 before the body;
* malformed (5 %): a `Content-Length` that is not a number — 400;
* slow-loris (5 %): headers and half a body, then silence — 408 after the server's body timeout (10 s).

Reported: per kind the status counts; for good requests p50/p99 latency and throughput; 5xx answers to
well-formed requests (goal: 0); the server's resident memory sampled every second (goal: flat — the last
quarter's peak within 10 % of the first quarter's).

    .venv/bin/python bench/serve_load.py      # ~1.5 min; writes bench/results/serve_load.json/.md
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_speed import DATA, RESULTS, ensure_data  # noqa: E402

KINDS = [("good", 70), ("broken", 10), ("pixel-bomb", 5), ("over-limit", 5), ("malformed", 5), ("slow-loris", 5)]
EXPECTED = {"good": 200, "broken": 422, "pixel-bomb": 413, "over-limit": 413, "malformed": 400, "slow-loris": 408}
BOUNDARY = "visiontuneload"


#: The bearer token the served model wants (serve requires one by default; the clients send it).
TOKEN = "bench-token-0123456789abcdef"

def multipart(name: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def pixel_bomb() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def head(length: str | int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Authorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def read_status(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed without a status line ({answer[:40]!r})")
        answer += chunk
    return int(answer.split(b" ")[1])


def raw_exchange(port: int, data: bytes, timeout: float = 60) -> int:
    """Send `data` on a fresh connection and return the status the server answers (it may answer early)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking everything: read what it said
        return read_status(sock)


def good_request(port: int, body: bytes) -> tuple[int, bool]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                                                      "Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        payload = response.read()
        return response.status, response.status == 200 and bool(json.loads(payload)["predictions"])
    finally:
        connection.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(classifier: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "visiontune.cli", "serve", str(classifier), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "VISIONTUNE_TOKEN": TOKEN})  # the default: a token is required
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start in 120 s")


def run_load(port: int, pid: int, seconds: float, clients: int, images: list[bytes]) -> dict:
    bomb = multipart("bomb.png", pixel_bomb())
    broken = multipart("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 200)
    goods = [multipart(f"{i}.png", data) for i, data in enumerate(images)]
    statuses: dict[str, Counter] = defaultdict(Counter)
    good_latency: list[float] = []
    wrong_answers: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def send(kind: str, rng: random.Random) -> int:
        if kind == "good":
            started = time.perf_counter()
            status, answered = good_request(port, rng.choice(goods))
            with lock:
                if status == 200 and answered:
                    good_latency.append(time.perf_counter() - started)
            return status
        if kind == "broken":
            return raw_exchange(port, head(len(broken)) + broken)
        if kind == "pixel-bomb":
            return raw_exchange(port, head(len(bomb)) + bomb)
        if kind == "over-limit":
            return raw_exchange(port, head(11 * 1024 * 1024) + b"x" * 65536)
        if kind == "malformed":
            return raw_exchange(port, head("12abc") + b"x" * 12)
        body = rng.choice(goods)  # slow-loris: half the body, then nothing until the server gives up
        return raw_exchange(port, head(len(body)) + body[: len(body) // 2])

    def client(seed: int) -> None:
        rng = random.Random(seed)
        names, weights = zip(*KINDS)
        while time.monotonic() < stop:
            kind = rng.choices(names, weights)[0]
            try:
                status = send(kind, rng)
            except Exception as exc:  # a refused or dropped connection is counted, whatever its kind
                status = f"{type(exc).__name__}"
            with lock:
                statuses[kind][status] += 1
                if status != EXPECTED[kind] and len(wrong_answers) < 10:
                    wrong_answers.append(f"{kind}: {status}")

    memory: list[tuple[float, float]] = []
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        memory.append((time.monotonic() - started, rss_mb(pid)))
        time.sleep(1.0)
    wall = time.monotonic() - started
    ms = sorted(1000 * x for x in good_latency)
    quarter = max(1, len(memory) // 4)
    first, last = max(m for _, m in memory[:quarter]), max(m for _, m in memory[-quarter:])
    well_formed_5xx = sum(n for kind in ("good", "broken", "pixel-bomb") for status, n in statuses[kind].items()
                          if isinstance(status, int) and status >= 500)
    return {
        "seconds": seconds, "clients": clients, "wall_s": wall,
        "statuses": {kind: {str(k): v for k, v in counts.items()} for kind, counts in statuses.items()},
        "good_ok": len(good_latency), "good_per_s": len(good_latency) / wall,
        "good_p50_ms": ms[len(ms) // 2] if ms else None, "good_p99_ms": ms[max(0, int(len(ms) * 0.99) - 1)] if ms else None,
        "well_formed_5xx": well_formed_5xx, "unexpected": wrong_answers,
        "rss_mb_first_quarter_peak": first, "rss_mb_last_quarter_peak": last, "rss_mb_max": max(m for _, m in memory),
        "rss_mb_samples": [round(m, 1) for _, m in memory],
    }


def report(result: dict) -> str:
    lines = [f"`visiontune serve` (default limits), {result['clients']} clients for {result['seconds']:.0f} s, mixed requests:", "",
             "| request | expected | answered |", "|---|---|---|"]
    for kind, _ in KINDS:
        counts = ", ".join(f"{status}: {n}" for status, n in sorted(result["statuses"].get(kind, {}).items()))
        lines.append(f"| {kind} | {EXPECTED[kind]} | {counts} |")
    lines += ["", f"- good requests answered: {result['good_ok']} ({result['good_per_s']:.1f}/s), latency p50 "
                  f"{result['good_p50_ms']:.0f} ms, p99 {result['good_p99_ms']:.0f} ms",
              f"- 5xx answers to well-formed requests: {result['well_formed_5xx']}",
              f"- server RSS: first-quarter peak {result['rss_mb_first_quarter_peak']:.0f} MB, last-quarter peak "
              f"{result['rss_mb_last_quarter_peak']:.0f} MB, max {result['rss_mb_max']:.0f} MB"]
    if result["unexpected"]:
        lines.append(f"- unexpected answers (first 10): {result['unexpected']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    ensure_data()
    from predict_speed import make_classifier

    images = [p.read_bytes() for p in sorted((DATA / "valid").rglob("*.png"))[:200]]
    with tempfile.TemporaryDirectory() as tmp:
        make_classifier(Path(tmp))
        server, port = start_server(Path(tmp) / "classifier")
        try:
            result = run_load(port, server.pid, args.seconds, args.clients, images)
        finally:
            server.terminate()
            server.wait(timeout=30)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2))
    text = report(result)
    (RESULTS / "serve_load.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
