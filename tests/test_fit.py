"""api.fit end to end on synthetic folders: artifacts, reloading, determinism, skips, fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

import visiontune as vt
from visiontune.data.catalog import DataError
from visiontune.runs import RunExistsError

FAST = {"img_size": 64, "epochs": 8}


def test_fit_writes_the_run_and_the_classifier(class_folders, tmp_path):
    (class_folders / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    clf = vt.fit(class_folders, out=tmp_path / "run", **FAST)
    run = tmp_path / "run"
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "split.json", "skipped.txt", "checkpoints"):
        assert (run / name).exists(), name
    assert clf.metrics["accuracy"] >= 0.9  # colours are easy; chance is 0.33
    assert "broken.png" in (run / "skipped.txt").read_text()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["arch"] == "tf_efficientnet_lite0" and config["seed"] == 0
    assert json.loads((run / "plan.json").read_text())["img_size"] == 64
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["phase"].startswith("cached:")] == list(range(1, 9))
    assert lines[-1]["phase"] == "final"
    meta = json.loads((run / "classifier" / "classifier.json").read_text())
    assert meta["classes"] == ["blue", "green", "red"] and meta["preprocessing"]["input_size"] == 64
    assert "classifier.weight" in load_file(str(run / "classifier" / "model.safetensors"))
    assert not list(run.rglob("*.pkl")) and not list(run.rglob("*.pt"))


def test_saved_classifier_reproduces_the_validation_metrics(class_folders, tmp_path):
    clf = vt.fit(class_folders, out=tmp_path / "run", **FAST)
    valid = json.loads((tmp_path / "run" / "split.json").read_text())["valid"]
    loaded = vt.load(tmp_path / "run")
    predictions = loaded.predict(valid, topk=2)
    truth = [p.split("/")[-2] for p in valid]
    accuracy = np.mean([p.label == t for p, t in zip(predictions, truth)])
    assert accuracy == pytest.approx(clf.metrics["accuracy"], abs=1.5 / len(valid))
    single = loaded.predict(valid[0])
    assert single.path == valid[0] and len(single.classes) == 3 and sum(single.probs) == pytest.approx(1, abs=1e-4)


def test_same_seed_same_numbers(class_folders, tmp_path):
    """Two separate processes with separate feature caches: every saved tensor and metric identical."""
    import json
    import os
    import subprocess
    import sys

    for name in ("a", "b"):
        done = subprocess.run(
            [sys.executable, "-m", "visiontune", "train", str(class_folders), "--out", str(tmp_path / name), "--seed", "5",
             "--img-size", "64", "--epochs", "8", "--views", "1", "--no-report"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "VISIONTUNE_CACHE": str(tmp_path / f"cache-{name}")},
        )
        assert done.returncode == 0, done.stderr
    wa = load_file(str(tmp_path / "a" / "classifier" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "classifier" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    meta = [json.loads((tmp_path / n / "classifier" / "classifier.json").read_text())["metrics"] for n in ("a", "b")]
    timings = ("seconds", "wall_seconds", "predicted_seconds")
    assert [{k: v for k, v in m.items() if k not in timings} for m in meta][0] == \
        [{k: v for k, v in m.items() if k not in timings} for m in meta][1]
    a = vt.load(tmp_path / "a")
    c = vt.fit(class_folders, out=tmp_path / "c", seed=6, **FAST)
    assert (tmp_path / "c" / "split.json").read_text() != (tmp_path / "a" / "split.json").read_text()
    assert c.metrics["log_loss"] != a.metrics["log_loss"]


def test_existing_run_is_never_overwritten(class_folders, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="nothing was overwritten"):
        vt.fit(class_folders, out=out, **FAST)
    assert (out / "precious.txt").read_text() == "keep me"


def test_fit_on_unusable_data_fails_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files found"):
        vt.fit(tmp_path / "empty", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_finetune_phase_trains_the_body_and_checkpoints(class_folders, tmp_path):
    before = vt.fit(class_folders, out=tmp_path / "head", **FAST)
    after = vt.fit(class_folders, out=tmp_path / "ft", unfreeze=1, batch_size=16, **FAST)
    lines = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    finetune = [r for r in lines if r["phase"] == "finetune"]
    assert len(finetune) == 1 and np.isfinite(finetune[0]["train_loss"])
    assert after.metrics["accuracy"] >= 0.9
    head_body = load_file(str(tmp_path / "head" / "classifier" / "model.safetensors"))
    ft_body = load_file(str(tmp_path / "ft" / "classifier" / "model.safetensors"))
    assert not np.allclose(head_body["conv_stem.weight"].numpy(), ft_body["conv_stem.weight"].numpy())
    assert np.array_equal(head_body["bn1.running_mean"].numpy(), ft_body["bn1.running_mean"].numpy())  # BN frozen
    assert (tmp_path / "ft" / "checkpoints" / "last.json").exists()
    del before
