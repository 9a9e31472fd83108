"""Shared fixtures: small synthetic image folders, a private feature cache for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Class name -> base colour; images are that colour with noise and a random bright square,
#: easy for pretrained features to separate, so end-to-end tests can assert high accuracy.
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_image(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 48) -> Image.Image:
    base = np.array(colour, dtype=np.float32)[None, None, :]
    noise = rng.normal(0, 25, size=(size, size, 3))
    arr = np.clip(base + noise, 0, 255)
    x, y = rng.integers(0, size - 12, size=2)
    arr[y : y + 12, x : x + 12] = 255
    return Image.fromarray(arr.astype(np.uint8))


def write_class_folders(root: Path, per_class: int = 12, seed: int = 0, classes=COLOURS) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(colour, rng).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache so tests never see each other's features."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "data")


def run_cli(*args: str, timeout: int = 600, fresh: bool = False):
    """`visiontune ARGS` as a user types it, with its exit code, stdout and stderr (a wide terminal, so rich
    tables are not cut). In this test process by default — a fresh interpreter costs ~6 s of imports, and most
    tests check what a command does, not that it starts — or in a fresh process with `fresh=True` (what a
    test of start-up, signals or process isolation needs). In process, an unexpected exception becomes exit
    code 1 with its traceback on stderr, as the process would print it."""
    import os
    import subprocess
    import sys

    if fresh:
        return subprocess.run([sys.executable, "-m", "visiontune.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    return _cli_in_process(list(args))


def _cli_in_process(argv: list[str]):
    import contextlib
    import io
    import os
    import signal
    import subprocess
    import traceback

    from visiontune import cli
    from visiontune.progress import console

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    columns, width = os.environ.get("COLUMNS"), console.width
    os.environ["COLUMNS"] = "200"
    console.width = 200
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as stop:  # argparse's errors and --help
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:  # noqa: BLE001 - what the process would print before dying with 1
                traceback.print_exc()
                code = 1
    finally:
        for signum, handler in handlers.items():  # `train` takes SIGTERM/SIGINT for its run (visiontune/stopping.py)
            signal.signal(signum, handler)
        from visiontune import stopping

        stopping.reset()
        console.width = width
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return subprocess.CompletedProcess(["visiontune", *argv], code, out.getvalue(), err.getvalue())


def cli_with_fault(*args: str, cache: Path, fault: str | None = None):
    """`visiontune ARGS` in a fresh process with a private cache of small shards (several per run), and with
    `VISIONTUNE_FAULT=fault` when given: the process SIGKILLs itself at that point (visiontune/files.py)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VISIONTUNE_CACHE": str(cache), "VISIONTUNE_SHARD_SIZE": "8"}
    env.pop("VISIONTUNE_FAULT", None)
    if fault:
        env["VISIONTUNE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "visiontune.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def metrics_records(run: Path, leave_out: tuple[str, ...] = ()) -> list[dict]:
    """The run's metrics.jsonl records without the keys in `leave_out` (timings differ between runs)."""
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k not in leave_out} for r in records]


def trained_data(root: Path, per_class: int = 14) -> Path:
    """Class folders under `root/data` and a private feature cache for a module-scoped fixture."""
    import os

    data = write_class_folders(root / "data", per_class=per_class)
    os.environ["VISIONTUNE_CACHE"] = str(root / "cache")
    return data


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

#: Browser tests run where Debian's chromium + chromium-driver are installed (`make test` installs them
#: and sets VISIONTUNE_REQUIRE_BROWSER, so there a missing browser fails instead of skipping).
needs_browser = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()) and not __import__("os").environ.get("VISIONTUNE_REQUIRE_BROWSER"),
    reason="Debian chromium + chromium-driver not installed (make test installs them)",
)


def chromium(user_data_dir: Path, window: str = "1200,2400"):
    """A headless Chromium WebDriver with the flags this machine's closed network needs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync", f"--window-size={window}",
                 f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


#: Test files by how long they take (tests/ durations on 2 cores, longest first). `make test` runs the suite in
#: worker processes, one file per worker at a time (pytest-xdist --dist loadfile: module fixtures are built once);
#: handing out the longest files first keeps a long one from starting last while the other workers sit idle.
LONGEST_FIRST = ("test_gpu_check.py", "test_integration.py", "test_faults.py", "test_ship.py", "test_cli.py",
                 "test_playbook_fit.py", "test_beyond.py", "test_hostile.py", "test_fit.py", "test_serve_auth.py",
                 "test_distributed.py", "test_report.py", "test_multilabel.py", "test_registry.py", "test_heads.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


def _required_everything() -> bool:
    import os

    return bool(os.environ.get("VISIONTUNE_REQUIRE_BROWSER") or os.environ.get("VISIONTUNE_REQUIRE_DATA"))


def _fail_skips(report) -> None:
    """Under `make test` (VISIONTUNE_REQUIRE_*) a skip fails the run: a missing browser, data set or library must
    not pass quietly as a skipped test."""
    if report.skipped and _required_everything() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under make test (VISIONTUNE_REQUIRE_*), which runs every test: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skips(outcome.get_result())
