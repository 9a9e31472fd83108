"""The playbook through fit() and the CLI: resume after SIGKILL, freezing, folds, auto LR / batch size,
TensorBoard, doctor, augmentation presets, flags recorded in the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import visiontune as vt
from visiontune.data.catalog import catalog_from_folders
from visiontune.data.transforms import AUGMENTATIONS, PCALighting, Preprocessing, augmentation
from visiontune.backbones.registry import create_backbone
from visiontune.train.phases import finetune
from visiontune.train.plan import Plan

FAST = {"img_size": 64, "epochs": 4}


def cli(*args, **popen):
    return [sys.executable, "-m", "visiontune.cli", *args]


def weights(run):
    return load_file(str(run / "classifier" / "model.safetensors"))


def test_resume_after_sigkill_mid_epoch_reaches_the_same_result(class_folders, tmp_path):
    args = [str(class_folders), "--img-size", "64", "--epochs", "3", "--unfreeze", "2", "--batch-size", "4",
            "--checkpoint-every", "2", "--mixup", "0.2"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(cli("train", *args, "--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    position = None
    while time.time() < deadline and process.poll() is None:
        meta = killed / "checkpoints" / "last.json"
        if meta.exists():
            try:
                position = json.loads(meta.read_text())["position"]
            except json.JSONDecodeError:
                position = None
            if position and position["phase"] == "finetune" and position["step"] >= 2:
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid fine-tuning"
    assert not (killed / "classifier").exists()
    resumed = subprocess.run(cli("train", "--resume", str(killed)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "finetune" in resumed.stderr
    whole = tmp_path / "whole"
    done = subprocess.run(cli("train", *args, "--out", str(whole)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    a, b = weights(killed), weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in b)
    final = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("seconds", "wall_seconds", "predicted_seconds")} for r in records]  # noqa: E731
    assert strip(final) == strip(reference)  # no duplicated or missing epochs either


def image_plan(**changes) -> Plan:
    base = dict(
        recipe="full", cut="pooled", views=0, img_size=64, batch_size=12, epochs=0, lr=1e-2, head_dropout=0.0,
        weight_decay=0.0, finetune_epochs=2, finetune_lr=1e-2, unfreeze_groups=-1, bn_freeze=True, lr_mult=10.0,
        engine="torch", valid_fraction=0.2, seed=0,
    )
    return Plan(**{**base, **changes})


@pytest.mark.parametrize(
    "changes,moved,still",
    [
        ({"freeze_to": "blocks.5"}, ["blocks.5.0.conv_pw.weight", "blocks.6.0.conv_pw.weight"], ["blocks.4.0.conv_pw.weight", "conv_stem.weight"]),
        ({"gradual": True}, ["blocks.5.0.conv_pw.weight", "blocks.6.0.conv_pw.weight"], ["blocks.4.0.conv_pw.weight", "conv_stem.weight"]),
        ({}, ["conv_stem.weight", "blocks.4.0.conv_pw.weight"], []),
    ],
)
def test_freeze_to_and_gradual_unfreezing_choose_what_trains(class_folders, changes, moved, still):
    backbone = create_backbone(num_classes=3, img_size=64)
    catalog = catalog_from_folders(class_folders)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    plan = image_plan(**changes)
    finetune(backbone.model, catalog, catalog.subset([0, 1]), backbone.preprocessing, plan, lambda r: None, None, [])
    after = backbone.model.state_dict()
    for name in moved:
        assert not torch.equal(before[name], after[name]), name
    for name in still:
        assert torch.equal(before[name], after[name]), name
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # BN frozen throughout


def test_folds_train_k_models_and_ensemble_them(class_folders, tmp_path):
    ensemble = vt.fit(class_folders, out=tmp_path / "cv", folds=3, **FAST)
    summary = json.loads((tmp_path / "cv" / "folds.json").read_text())
    assert len(summary["accuracy"]) == 3 and summary["accuracy_mean"] == pytest.approx(np.mean(summary["accuracy"]))
    assert summary["accuracy_std"] == pytest.approx(np.std(summary["accuracy"]))
    valid = [p for k in range(1, 4) for p in json.loads((tmp_path / "cv" / f"fold-{k}" / "split.json").read_text())["valid"]]
    assert sorted(valid) == sorted(str(p) for p in class_folders.rglob("*.png"))  # each image validated once
    loaded = vt.load(tmp_path / "cv")
    assert len(loaded.members) == 3
    red = sorted((class_folders / "red").glob("*.png"))[:4]
    assert [p.label for p in loaded.predict(red)] == ["red"] * 4
    assert ensemble.metrics["folds"] == 3


def test_auto_lr_and_batch_size_are_measured_and_recorded(class_folders, tmp_path):
    vt.fit(class_folders, out=tmp_path / "run", lr="auto", batch_size="auto", **FAST)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    found = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert plan["lr"] == pytest.approx(found["suggestion"], rel=1e-3) and "LR finder" in plan["why"]["lr"]
    assert (tmp_path / "run" / "lr_find.png").stat().st_size > 5000
    assert plan["batch_size"] in (8, 16, 32, 64, 128, 256) and "inner-validation accuracy" in plan["why"]["batch_size"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["auto"] == ["batch_size", "lr"]


def test_eval_every_logs_steps_to_metrics_and_tensorboard(class_folders, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vt.fit(class_folders, out=tmp_path / "run", eval_every=3, batch_size=8, **FAST)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("kind") == "step"]
    assert steps and all(s % 3 == 0 for s in steps) and "valid_accuracy" in records[0]
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "cached:blocks.6/valid_loss" in tags or "cached:pooled/valid_loss" in tags
    assert len(events.Scalars(tags[0])) >= len(steps)


def test_train_flags_reach_the_plan_and_the_config(class_folders, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        cli("train", str(class_folders), "--out", str(run), "--img-size", "64", "--epochs", "3", "--label-smoothing",
            "0.1", "--schedule", "sgdr", "--optimizer", "sgd", "--ema", "0.99", "--no-bn-freeze", "--aug", "strong"),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["label_smoothing"], plan["schedule"], plan["optimizer"], plan["ema"], plan["bn_freeze"], plan["aug"]) == (
        0.1, "sgdr", "sgd", 0.99, False, "strong")
    overrides = yaml.safe_load((run / "config.yaml").read_text())["overrides"]
    assert overrides["label_smoothing"] == 0.1 and overrides["bn_freeze"] is False
    bad = subprocess.run(cli("train", str(class_folders), "--swa", "--ema", "0.9"), capture_output=True, text=True)
    assert bad.returncode == 2 and "choose one" in bad.stderr


def test_doctor_flags_conflicting_duplicates_and_overfits(class_folders, tmp_path):
    source = sorted((class_folders / "red").glob("*.png"))[0]
    (class_folders / "blue" / "copy.png").write_bytes(source.read_bytes())
    result = subprocess.run(cli("doctor", str(class_folders)), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 1  # unhealthy: same image, two labels
    assert "different labels" in result.stderr and "copy.png" in result.stderr
    assert "ok, the pipeline can learn" in result.stdout and "mean / std" in result.stdout


def test_augmentation_presets_differ_in_strength(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8))
    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    spread = {}
    for preset in AUGMENTATIONS:
        torch.manual_seed(0)
        samples = torch.stack([augmentation(pre, preset)(image) for _ in range(12)])
        assert samples.shape == (12, 3, 64, 64)
        spread[preset] = float(samples.std(0).mean())
    assert spread["none"] == 0.0
    assert spread["light"] < spread["strong"]
    names = {p: [type(t).__name__ for t in augmentation(pre, p).transforms] for p in AUGMENTATIONS}
    assert "RandomVerticalFlip" in names["aerial"] and "RandomVerticalFlip" not in names["light"]
    assert {"RandomErasing", "ColorJitter", "PCALighting"} <= set(names["strong"])
    torch.manual_seed(0)
    grey = torch.full((3, 4, 4), 0.5)
    shifted = PCALighting(0.5)(grey)
    delta = (shifted - grey)[:, 0, 0]
    assert delta.abs().sum() > 0 and torch.allclose(shifted - grey, delta.view(3, 1, 1).expand(3, 4, 4))


def test_augment_preview_writes_a_grid(class_folders, tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run(cli("augment-preview", str(class_folders), "--aug", "strong", "--out", str(out),
                                "--images", "2", "--samples", "3", "--img-size", "64"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size[0] > 300
