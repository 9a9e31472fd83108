"""Issue G: every command runs against one folder holding everything a real folder contains by accident
(tests/hostile_corpus.py). Each problem is reported once with its file and reason, the run completes on the
good files, the user's folder is left byte-for-byte as it was, and nothing outside it is opened — checked
with a Python audit hook in the real CLI process, not by trusting the code's intentions."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostile_corpus import build_corpus

FAST = ["--img-size", "64", "--epochs", "2"]

#: Runs `visiontune ARGS` with an audit hook that logs every file opened under a forbidden folder.
AUDITED = r"""
import os, sys
forbidden, log = os.path.realpath(sys.argv[1]) + os.sep, sys.argv[2]
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        real = os.path.realpath(os.fsdecode(args[0]))
        if real.startswith(forbidden):
            with open(log, "a") as handle:
                handle.write(real + "\n")
sys.addaudithook(hook)
from visiontune.cli import main
sys.exit(main(sys.argv[3:]))
"""


def audited_cli(corpus, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`visiontune ARGS` in a fresh process; fails the test if anything under `corpus.outside` was opened."""
    log = tmp_path / f"opened-outside-{abs(hash(args))}.log"
    result = subprocess.run([sys.executable, "-c", AUDITED, str(corpus.outside), str(log), *args],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "250"})
    opened = log.read_text().splitlines() if log.exists() else []
    assert not opened, f"visiontune {' '.join(args)} opened files outside the data folder: {opened}"
    return result


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below `folder`: a file's content hash, a link's target (links are not followed)."""
    entries = {}
    for here, dirs, names in os.walk(folder, followlinks=False):
        for name in dirs + names:
            path = Path(here) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                entries[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                entries[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[rel] = "dir"
    return entries


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    os.environ["VISIONTUNE_CACHE"] = str(root / "cache")  # one cache for the module's commands
    made = build_corpus(root)
    made.before = {"data": snapshot(made.data), "flat": snapshot(made.flat), "outside": snapshot(made.outside)}
    return made


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-run")
    result = audited_cli(corpus, tmp, "train", str(corpus.data), "--out", str(tmp / "run"), *FAST)
    return tmp / "run", result


def skipped_lines(run: Path) -> dict[str, str]:
    lines = [line.split("\t", 1) for line in (run / "skipped.txt").read_text().splitlines() if line]
    paths = [path for path, _ in lines]
    assert len(paths) == len(set(paths)), f"a problem reported twice: {paths}"
    return dict(lines)


def test_train_completes_and_reports_each_problem_once(corpus, trained):
    run, result = trained
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skipped = skipped_lines(run)
    for rel, word in corpus.skipped.items():
        reason = skipped.get(str(corpus.data / rel))
        assert reason is not None and word in reason.lower(), (rel, reason)
    split = json.loads((run / "split.json").read_text())
    used = set(split["train"]) | set(split["valid"])
    assert {str(corpus.data / rel) for rel in corpus.used} <= used  # odd but valid images are trained on
    everything = used | set(skipped)
    for rel in corpus.ignored:  # junk: not a class, not an image, not a problem
        assert not any(rel in p for p in everything), rel
    assert split["classes"] == ["blue", "green", "red"]  # not __MACOSX, not .hidden-class
    assert len(skipped) == len(corpus.skipped) + 2  # + the symlink loop and the folder link leading outside


def test_train_reports_the_same_image_in_two_classes(corpus, trained):
    run, result = trained
    leakage = json.loads((run / "leakage.json").read_text())
    groups = [sorted(p for p, _ in group) for group in leakage["conflicting"]]
    assert sorted(str(corpus.data / rel) for rel in corpus.duplicate_across_classes) in groups
    assert "same image in different classes" in result.stdout + result.stderr
    assert "images in two classes at once" in (run / "report.html").read_text()


def test_a_labels_csv_with_every_mistake_trains_on_its_good_rows(corpus, tmp_path):
    out = tmp_path / "csv-run"
    result = audited_cli(corpus, tmp_path, "train", str(corpus.flat), "--labels", str(corpus.labels_csv),
                         "--out", str(out), *FAST, "--no-report")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skipped = list(csv.reader((out / "skipped.txt").open(), delimiter="\t"))
    for name, word in corpus.csv_skipped.items():
        hits = [reason for path, reason in skipped if path.endswith(name)]
        assert len(hits) == 1 and word in hits[0], (name, hits)
    split = json.loads((out / "split.json").read_text())
    assert split["classes"] == ["blue", "green", "red"]  # the header's names were understood, label column first
    assert len(split["train"]) + len(split["valid"]) == 29  # 30 files, less the one with two labels


@pytest.mark.parametrize("command", ["plan", "doctor", "cache", "evaluate", "predict"])
def test_every_command_completes_on_the_corpus(corpus, trained, tmp_path, command):
    run, _ = trained
    data = str(corpus.data)
    args = {"plan": ["plan", data], "doctor": ["doctor", data],
            "cache": ["cache", "build", data, "--img-size", "64"],
            "evaluate": ["evaluate", str(run), data],
            "predict": ["predict", str(run), data, "--csv", str(tmp_path / "predictions.csv")]}[command]
    result = audited_cli(corpus, tmp_path, *args)
    expected = 1 if command == "doctor" else 0  # doctor: exit 1 = "something needs fixing" (the label conflicts)
    assert result.returncode == expected, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if command == "doctor":
        assert "same image, different labels" in result.stdout + result.stderr
    if command == "predict":
        rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
        predicted = {row["path"] for row in rows}
        assert {str(corpus.data / rel) for rel in corpus.used} <= predicted
        assert not any(str(corpus.data / rel) in predicted for rel in corpus.skipped)
        assert not any("secret" in p or "__MACOSX" in p for p in predicted)


def test_the_server_answers_every_corpus_file_without_a_server_error(corpus, trained):
    from fastapi.testclient import TestClient

    import visiontune as vt
    from visiontune.serve.app import create_app

    client = TestClient(create_app(vt.load(trained[0]), no_auth=True))
    for rel in corpus.used + list(corpus.skipped):
        path = corpus.data / rel
        if not path.is_file() or path.is_symlink():
            continue
        answer = client.post("/predict", json={"images": [base64.b64encode(path.read_bytes()).decode()]})
        if rel in corpus.used:
            assert answer.status_code == 200, (rel, answer.text)
        else:
            assert 400 <= answer.status_code < 500 and answer.json()["error"], (rel, answer.text)


def test_the_users_folders_are_untouched(corpus, trained, tmp_path):
    """Last in the module: after every command above, the data, the CSV folder and the outside folder hold
    exactly what they held before (no file written, moved, deleted or re-encoded; links unchanged)."""
    test_every_command_completes_on_the_corpus(corpus, trained, tmp_path, "predict")
    assert snapshot(corpus.data) == corpus.before["data"]
    assert snapshot(corpus.flat) == corpus.before["flat"]
    assert snapshot(corpus.outside) == corpus.before["outside"]


def test_split_folders_made_of_symlinks_stay_usable(corpus, tmp_path, monkeypatch):
    """`split` falls back to symlinks across file systems; those point out of the split folder into the
    source, which the links file allows — and nothing else."""
    from visiontune.data import split as split_module
    from visiontune.data.catalog import discover

    def no_hard_links(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(split_module.os, "link", no_hard_links)
    dest = tmp_path / "split"
    source = discover(corpus.data)
    counts = split_module.write_split_folders(source.train, corpus.data, dest, 0.25, seed=0)
    assert counts["links"] == {"symlink": len(source.train)}
    again = discover(dest)
    assert len(again.train) + len(again.valid) == len(source.train) and not again.train.skipped
