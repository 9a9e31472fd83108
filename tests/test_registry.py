"""visiontune runs: every run under a folder with its status, and two runs compared (read-only)."""

from __future__ import annotations

import shutil

import visiontune as vt
from conftest import run_cli
from visiontune.registry import compare_runs, list_runs


def test_runs_are_listed_with_status_and_compared(class_folders, tmp_path):
    root = tmp_path / "runs"
    vt.fit(class_folders, out=root / "short", img_size=64, epochs=2, report=False)
    vt.fit(class_folders, out=root / "long", img_size=64, epochs=5, report=False)
    shutil.copytree(root / "long", root / "stopped")
    shutil.rmtree(root / "stopped" / "classifier")  # a run killed after its last checkpoint
    (root / "not-a-run").mkdir()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    rows = {row.path.name: row for row in list_runs(root)}
    assert set(rows) == {"short", "long", "stopped"}
    assert rows["short"].status == rows["long"].status == "finished" and rows["stopped"].status == "interrupted"
    assert rows["long"].metric.startswith("accuracy ") and rows["long"].wall_s > 0 and rows["stopped"].metric == "-"
    assert "2 ep" in rows["short"].recipe and "5 ep" in rows["long"].recipe and rows["long"].data == "data"

    differences = {key: (a, b) for key, a, b in compare_runs(root / "short", root / "long")}
    assert differences["plan.epochs"] == (2, 5) and "metrics.accuracy" in differences
    assert "config.arch" not in differences  # only what differs (and the headline metrics)

    listed = run_cli("runs", str(root))
    assert listed.returncode == 0 and "interrupted" in listed.stdout and "finished" in listed.stdout
    compared = run_cli("runs", "compare", str(root / "short"), str(root / "long"))
    assert compared.returncode == 0 and "plan.epochs" in compared.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # listing never writes into a run
