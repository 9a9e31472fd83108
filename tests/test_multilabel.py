"""Multi-label classification (the Kaggle Planet case): tags CSV -> sigmoid + BCE -> F2 thresholds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import visiontune as vt
from visiontune.data.catalog import catalog_from_csv
from visiontune.evaluation.metrics import multilabel_metrics, tune_thresholds

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220)}


def write_tagged(root, n=72, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        tags = [c for c in COLOURS if rng.random() < 0.5] or [str(rng.choice(list(COLOURS)))]
        image = np.full((48, 48, 3), 128, dtype=np.uint8) + rng.integers(-10, 10, (48, 48, 3)).astype(np.uint8)
        for k, tag in enumerate(tags):
            x, y = rng.integers(0, 28, size=2)
            image[y : y + 20, x : x + 20] = COLOURS[tag]
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        rows.append((f"images/{i:03d}.png", " ".join(tags)))
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "tags"])
        writer.writerows(rows)
    return root


def test_tags_csv_becomes_a_multi_label_catalog(tmp_path):
    root = write_tagged(tmp_path)
    catalog = catalog_from_csv(root, root / "labels.csv")
    assert catalog.multi_label and catalog.classes == ["blue", "green", "red"]
    targets = catalog.targets()
    assert targets.shape == (72, 3) and (targets.sum(1) >= 1).all() and (targets.sum(1) > 1).any()


def test_thresholds_are_tuned_for_f2():
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 3)) < 0.3).astype(int)
    probs = np.clip(targets * 0.35 + rng.random((400, 3)) * 0.5, 0, 1)  # positives score low-ish
    tuned = tune_thresholds(targets, probs, beta=2.0)
    at_tuned = multilabel_metrics(targets, probs, tuned, ["a", "b", "c"])["f2_samples"]
    at_half = multilabel_metrics(targets, probs, np.full(3, 0.5), ["a", "b", "c"])["f2_samples"]
    assert at_tuned > at_half + 0.05 and (tuned < 0.5).all()  # F2 favours recall: lower thresholds


def test_multi_label_fit_predict_and_cli(tmp_path):
    root = write_tagged(tmp_path)
    clf = vt.fit(root, labels=root / "labels.csv", out=tmp_path / "run", img_size=64, epochs=20, cut="pooled")
    assert clf.multi_label and clf.metrics["f2_samples"] >= 0.8
    meta = json.loads((tmp_path / "run" / "classifier" / "classifier.json").read_text())
    assert meta["multi_label"] is True and len(meta["thresholds"]) == 3
    loaded = vt.load(tmp_path / "run")
    prediction = loaded.predict(str(root / "images" / "000.png"))
    assert prediction.tags is not None and len(prediction.tags) >= 1
    metrics = vt.evaluate(loaded, root, labels=root / "labels.csv")
    assert metrics["f2_samples"] >= 0.8 and "thresholds" in metrics
    out = tmp_path / "pred.csv"
    result = subprocess.run([sys.executable, "-m", "visiontune.cli", "predict", str(tmp_path / "run"), str(root / "images"),
                             "--csv", str(out)], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    truth = {r[0]: set(r[1].split()) for r in csv.reader((root / "labels.csv").open()) if r[0] != "image"}
    exact = np.mean([set(r["tags"].split()) == truth[f"images/{os.path.basename(r['path'])}"] for r in rows])
    assert exact >= 0.7
    check_multilabel_report(tmp_path / "run")
    shown = subprocess.run([sys.executable, "-m", "visiontune.cli", "show", str(tmp_path / "run"), "--mistakes"],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "every tag right on" in shown.stdout and "most confident wrong tags" in shown.stdout
    check_multilabel_outputs(tmp_path / "run", sorted((root / "images").glob("*.png"))[:8])


def check_multilabel_outputs(run, images):
    """Every output of a multi-label classifier speaks its task: exported graphs compute one sigmoid per class
    (not a softmax) and carry the thresholds; the server answers the same tags as predict; a folds-style
    ensemble of it gives back its own probabilities and thresholds."""
    import torch
    from fastapi.testclient import TestClient

    from visiontune.data.images import load_rgb
    from visiontune.data.transforms import eval_transform
    from visiontune.ensemble import Ensemble
    from visiontune.export.formats import load_exported
    from visiontune.serve.app import create_app

    clf = vt.load(run)
    kept, probs = clf.probabilities(images, engine="torch")
    assert len(kept) == len(images) and not np.allclose(probs.sum(1), 1.0, atol=1e-3)  # independent sigmoids
    expected = clf.predictions_of([p.name for p in images], probs)
    thresholds = clf.extra["thresholds"]
    transform = eval_transform(clf.preprocessing)
    batch = torch.stack([transform(load_rgb(p)) for p in images]).numpy()
    for fmt in ("onnx", "torchscript"):
        result = vt.api.export(run, fmt=fmt)
        assert result.parity["ok"], result.parity
        exported, meta = load_exported(result.path)
        assert meta["task"] == "multi-label" and json.loads(meta["thresholds"]) == thresholds and "sigmoid" in meta["output"]
        assert np.abs(exported(batch) - probs).max() < 1e-4
    client = TestClient(create_app(clf, no_auth=True))
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"]
    assert [p["tags"] for p in served] == [p.tags for p in expected]
    assert [p["label"] for p in served] == [p.label for p in expected]
    model = client.get("/model").json()
    assert model["task"] == "multi-label" and model["thresholds"] == thresholds
    twice = Ensemble.from_members([clf, vt.load(run)])
    _, together = twice.probabilities(images, engine="torch")
    assert np.abs(together - probs).max() < 1e-5 and twice.extra["thresholds"] == thresholds
    assert [p.tags for p in twice.predictions_of([p.name for p in images], together)] == [p.tags for p in expected]


def test_a_tag_that_never_comes_first_is_a_class(tmp_path):
    """Tags are sorted within a row, so 'carry' in 'bag carry' and 'shoe' in 'boot shoe' never come first;
    they are classes with images all the same (the emptiness check once counted first tags only)."""
    from visiontune.data.catalog import DataError, discover

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = [("bag carry", 4), ("boot shoe", 4), ("sandal shoe", 4)]
    lines = ["image,tags"]
    for k, (tags, n) in enumerate(rows):
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}-{i}.png")
            lines.append(f"images/{k}-{i}.png,{tags}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    source = discover(tmp_path, labels=tmp_path / "labels.csv")
    assert source.train.class_counts() == {"bag": 4, "boot": 4, "carry": 4, "sandal": 4, "shoe": 8}
    (tmp_path / "images" / "0-0.png").write_bytes(b"not a png")  # a tag whose every image is unreadable
    for i in range(1, 4):
        (tmp_path / "images" / f"0-{i}.png").write_bytes(b"not a png")
    try:
        discover(tmp_path, labels=tmp_path / "labels.csv")
        raise AssertionError("a tag with no usable image trained")
    except DataError as err:
        message = str(err)
    assert "tag(s) of labels.csv with no usable image: bag, carry" in message and "folder" not in message.split("Refused")[0]


def check_multilabel_report(run):
    """The run's report.html has every multi-label section, inline figures only, and one row per tag."""
    import re

    from visiontune.report.multilabel import MULTILABEL_SECTIONS

    page = (run / "report.html").read_text()
    for section in MULTILABEL_SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)) >= 10
    for tag in COLOURS:
        assert f"<tr><td>{tag}</td>" in page
    assert "most confident false tags" in page and "most confident misses" in page and "most uncertain tags" in page
    browser = os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")
    assert browser or not os.environ.get("VISIONTUNE_REQUIRE_BROWSER"), "make test requires chromium: apt-get install chromium chromium-driver"
    if browser:
        from selenium.webdriver.common.by import By

        from conftest import chromium

        driver = chromium(run / ".chromium")
        try:
            driver.get((run / "report.html").as_uri())
            assert [s.get_attribute("id") for s in driver.find_elements(By.CSS_SELECTOR, "section[id]")] == list(MULTILABEL_SECTIONS)
            images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
            assert images and all(done and width > 0 for done, width in images)
            assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        finally:
            driver.quit()


def test_multilabel_mistake_lists_match_brute_force():
    from visiontune.report.multilabel import image_losses, uncertain_pairs, worst_pairs

    rng = np.random.default_rng(3)
    targets = (rng.random((40, 5)) < 0.4).astype(int)
    probs = rng.random((40, 5))
    thresholds = rng.uniform(0.2, 0.8, 5)
    pairs = [(i, t) for i in range(40) for t in range(5)]
    false_tags = sorted((p for p in pairs if targets[p] == 0 and probs[p] >= thresholds[p[1]]), key=lambda p: -probs[p])
    misses = sorted((p for p in pairs if targets[p] == 1 and probs[p] < thresholds[p[1]]), key=lambda p: probs[p])
    closest = sorted(pairs, key=lambda p: abs(probs[p] - thresholds[p[1]]))[:7]
    assert len(false_tags) > 7 and len(misses) > 7
    assert worst_pairs(targets, probs, thresholds, positive=False, k=7) == false_tags[:7]
    assert worst_pairs(targets, probs, thresholds, positive=True, k=7) == misses[:7]
    assert worst_pairs(targets, probs, thresholds, positive=True, k=500) == misses  # only real mistakes, all of them
    assert uncertain_pairs(probs, thresholds, k=7) == closest
    bce = [-np.mean([np.log(probs[i, t]) if targets[i, t] else np.log(1 - probs[i, t]) for t in range(5)]) for i in range(40)]
    assert np.allclose(image_losses(targets, probs), bce)
