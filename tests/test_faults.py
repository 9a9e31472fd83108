"""Issue G: SIGKILL in every phase of `train` (caching, cached training, evaluation, saving the classifier, the
report) and of `export`. `VISIONTUNE_FAULT=<point>` makes the real CLI process send itself SIGKILL at that
point (visiontune/files.py: fault_point), so each phase is hit deterministically. After the kill, rerunning
(`train --resume`, or the same export) must complete with the same weights and metrics as a run that was
never interrupted, and no partial or damaged file may be left in the run folder or the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_with_fault, metrics_records, write_class_folders

ARGS = ["--img-size", "64", "--epochs", "3", "--head", "linear", "--batch-size", "8"]
STRIP = ("seconds", "wall_seconds", "predicted_seconds")


def cli(*args: str, fault: str | None = None, cache: Path) -> subprocess.CompletedProcess:
    return cli_with_fault(*args, cache=cache, fault=fault)


def final_metrics(run: Path) -> list[dict]:
    return metrics_records(run, STRIP)


def assert_nothing_partial_or_damaged(*folders: Path) -> None:
    for folder in folders:
        leftovers = [p for p in folder.rglob("*") if ".partial-" in p.name]
        assert not leftovers, f"partial files left behind: {leftovers}"
        for path in folder.rglob("*.json"):
            json.loads(path.read_text())  # every JSON whole
        for path in folder.rglob("*.safetensors"):
            load_file(str(path))  # every tensor file whole


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("faults") / "data", per_class=10)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    done = cli("train", str(data), "--out", str(root / "run"), *ARGS, cache=root / "cache")
    assert done.returncode == 0, done.stderr
    return root / "run"


@pytest.mark.parametrize("point", ["caching", "checkpoint", "evaluation", "classifier-half", "report"])
def test_a_run_killed_in_any_phase_resumes_to_the_uninterrupted_result(data, uninterrupted, tmp_path, point):
    run, cache = tmp_path / "run", tmp_path / "cache"
    killed = cli("train", str(data), "--out", str(run), *ARGS, fault=point, cache=cache)
    assert killed.returncode == -signal.SIGKILL, f"never reached {point}: {killed.stderr[-2000:]}"
    assert not (run / "classifier" / "classifier.json").exists() or point == "report"
    resumed = cli("train", "--resume", str(run), cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(run / "classifier" / "model.safetensors")), load_file(str(uninterrupted / "classifier" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert final_metrics(run) == final_metrics(uninterrupted)
    assert (run / "report.html").exists() and (run / "predictions.npz").exists()
    assert_nothing_partial_or_damaged(run, cache)


def test_an_export_killed_midway_leaves_no_file_and_the_rerun_succeeds(uninterrupted, tmp_path):
    out = tmp_path / "model.onnx"
    killed = cli("export", str(uninterrupted), "--format", "onnx", "--out", str(out), fault="export", cache=tmp_path)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # what the kill left: a partial file
    again = cli("export", str(uninterrupted), "--format", "onnx", "--out", str(out), cache=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_an_unwritable_output_folder_stops_at_once_with_what_to_do(data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli("train", str(data), "--out", str(blocker / "run"), *ARGS, cache=tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot be written" in result.stderr and "--out" in result.stderr


def test_a_full_disk_is_one_clear_error_and_the_run_resumes_once_there_is_room(data, uninterrupted, tmp_path):
    """`ulimit -f` (RLIMIT_FSIZE) makes the first write past 60 kB fail with EFBIG, as a full disk would (here:
    exporting the trunk for the cache, before the run folder exists); rerunning once there is room completes."""
    import resource

    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    run, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "VISIONTUNE_CACHE": str(cache)}
    env.pop("VISIONTUNE_FAULT", None)
    full = subprocess.run([sys.executable, "-m", "visiontune.cli", "train", str(data), "--out", str(run), *ARGS],
                          capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "no room to write" in full.stderr and "$VISIONTUNE_CACHE" in full.stderr
    assert_nothing_partial_or_damaged(tmp_path)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before  # the user's data untouched
    resumed = cli("train", "--resume", str(run), cache=cache) if run.exists() else \
        cli("train", str(data), "--out", str(run), *ARGS, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert final_metrics(run) == final_metrics(uninterrupted)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_mid_epoch_checkpoints_that_step_and_the_resume_is_exact(data, uninterrupted, tmp_path, signame):
    """SIGTERM (clusters, `docker stop`, spot VMs) and Ctrl-C arrive during step 4 (the second epoch's first): the
    step finishes, a checkpoint is written at it — no step lost — the command prints the resume command and exits
    128 + the signal; the resumed run ends with the uninterrupted run's weights and metrics."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    env_signal = {"VISIONTUNE_FAULT_SIGNAL": signame}
    os.environ.update(env_signal)
    try:
        stopped = cli("train", str(data), "--out", str(run), *ARGS, fault="step:4", cache=cache)
    finally:
        os.environ.pop("VISIONTUNE_FAULT_SIGNAL")
    assert stopped.returncode == 128 + getattr(signal, signame), stopped.stderr[-2000:]
    said = " ".join(stopped.stderr.split())
    assert f"stopped by {signame}" in said and f"visiontune train --resume {run}" in said
    position = json.loads((run / "checkpoints" / "last.json").read_text())["position"]
    assert position["global_step"] == 4 and position["step"] == 1, position  # mid-epoch, at the signal's step
    resumed = cli("train", "--resume", str(run), cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(run / "classifier" / "model.safetensors")), load_file(str(uninterrupted / "classifier" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert final_metrics(run) == final_metrics(uninterrupted)
    assert_nothing_partial_or_damaged(run, cache)
