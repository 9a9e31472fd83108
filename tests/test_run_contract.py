"""The run contract of docs/architecture.md: RunDir writes plan.json once, with the final plan; images
are read once on the way in for their header check and content hash."""

from __future__ import annotations

import builtins
import hashlib
import json

import visiontune as vt
from visiontune.data.catalog import discover
from visiontune.data.images import content_hash
from visiontune.runs import RunDir


def test_plan_json_is_written_once_with_the_final_plan(class_folders, tmp_path, monkeypatch):
    """... and the plan training then receives is final: as plan.json says, and refusing any change."""
    import pytest

    from visiontune.pipeline import run as pipeline_run

    written, trained_with = [], []
    original = RunDir.write_plan
    monkeypatch.setattr(RunDir, "write_plan", lambda self, plan: (written.append(plan.batch_size), original(self, plan)))
    train_model = pipeline_run.train_model
    monkeypatch.setattr(pipeline_run, "train_model", lambda prep, *a, **k: (trained_with.append(prep.plan), train_model(prep, *a, **k))[1])
    vt.fit(class_folders, out=tmp_path / "run", img_size=64, epochs=2, batch_size="auto", report=False)
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert written == [saved["batch_size"]]  # once, after the batch-size search chose
    assert saved["why"]["batch_size"].startswith("inner-validation accuracy") and "selection" in saved["why"]
    (plan,) = trained_with
    assert plan.to_dict() == saved
    with pytest.raises(AttributeError, match="the plan is final"):
        plan.epochs = 99


def test_header_check_and_content_hash_come_from_one_read(class_folders, monkeypatch):
    source = discover(class_folders)  # checks every header and hashes the same bytes
    paths = [str(p) for p in source.train.paths]
    real_open = builtins.open

    def no_second_read(file, *args, **kwargs):
        assert str(file) not in paths, f"{file} read again after the catalog check"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_second_read)
    for path in source.train.paths:
        assert content_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:32]
