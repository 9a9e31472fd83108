"""The run's report.html (in a real headless Chromium), and the report/show/hard-examples/TTA commands."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

import visiontune as vt
from visiontune.report.html import SECTIONS

FAST = {"img_size": 64, "epochs": 6}
from conftest import chromium, needs_browser, run_cli as cli, trained_data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = trained_data(root)
    vt.fit(data, out=root / "run", **FAST)
    return root / "run"


def test_report_is_self_contained_with_every_section(run):
    page = (run / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)
    assert len(images) >= 14
    interpretation = json.loads((run / "interpretation.json").read_text())
    assert {"most_incorrect", "most_correct", "most_uncertain", "top_losses", "most_confused"} <= set(interpretation)


@needs_browser
def test_report_renders_in_headless_chromium(run):
    from selenium.webdriver.common.by import By

    driver = chromium(run / ".chromium")
    try:
        driver.get((run / "report.html").as_uri())
        ids = [s.get_attribute("id") for s in driver.find_elements(By.CSS_SELECTOR, "section[id]")]
        assert ids == list(SECTIONS)
        images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        assert images and all(done and width > 0 for done, width in images)
        driver.set_window_size(1400, 900)  # thumbnail captions are page text, readable at 100 % zoom
        sizes = driver.execute_script(
            "return Array.from(document.querySelectorAll('figcaption')).map(c => c.getBoundingClientRect().height > 0 "
            "? parseFloat(getComputedStyle(c).fontSize) : 99);")
        assert sizes and min(sizes) >= 12, sizes
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        assert driver.save_screenshot(str(run / "report.png"))
    finally:
        driver.quit()
        shutil.rmtree(run / ".chromium", ignore_errors=True)
    assert (run / "report.png").stat().st_size > 20_000


def test_report_command_rebuilds_it(run):
    (run / "report.html").unlink()
    result = cli("report", str(run))
    assert result.returncode == 0, result.stderr
    assert '<section id="interpretation">' in (run / "report.html").read_text()


def test_show_mistakes_prints_a_table(run):
    result = cli("show", str(run), "--mistakes")
    assert result.returncode == 0, result.stderr
    assert "validation accuracy" in result.stdout and "most confident mistakes" in result.stdout


def test_hard_examples_and_upweighted_retraining(run, tmp_path):
    out = tmp_path / "hard.csv"
    result = cli("hard-examples", str(run), "--out", str(out), "--margin", "1.01")  # every image counts as hard
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert rows and {"path", "label", "predicted", "p_label", "kind"} <= set(rows[0])
    from visiontune.train.phases import _sample_weights
    from visiontune.train.plan import Plan

    split = json.loads((run / "split.json").read_text())
    plan = Plan.from_dict({**json.loads((run / "plan.json").read_text()), "upweight": str(out), "upweight_factor": 4.0})
    weights = _sample_weights(plan, __import__("numpy").array(split["train_labels"]), split["train"])
    hard = {str(Path(r["path"]).resolve()) for r in rows}
    for path, weight in zip(split["train"], weights.tolist()):
        assert weight == (4.0 if str(Path(path).resolve()) in hard else 1.0)


def test_evaluate_and_predict_with_tta(run):
    data = json.loads((run / "split.json").read_text())["valid"][0]
    folder = str(Path(data).parent.parent)
    plain = cli("evaluate", str(run), folder, "--json", str(run / "plain.json"))
    flipped = cli("evaluate", str(run), folder, "--tta", "flips", "--json", str(run / "tta.json"))
    assert plain.returncode == 0 and flipped.returncode == 0, flipped.stderr
    a, b = json.loads((run / "plain.json").read_text()), json.loads((run / "tta.json").read_text())
    assert a["n"] == b["n"] and a["log_loss"] != b["log_loss"]
    predicted = cli("predict", str(run), data, "--tta", "10crop", "--topk", "2")
    assert predicted.returncode == 0, predicted.stderr


@pytest.mark.parametrize("mode,how", [("flip", "mean"), ("5crop", "mean"), ("10crop", "geometric"), ("scale", "mean")])
def test_tta_probabilities_are_exactly_the_combined_views(run, mode, how):
    """Not only 'something changed': the TTA output is the model's softmax on each view, combined as asked."""
    import numpy as np
    import torch

    from visiontune.classifier import Classifier
    from visiontune.data.images import load_rgb
    from visiontune.inference.tta import tta_transform

    clf = Classifier.load(run)
    paths = json.loads((run / "split.json").read_text())["valid"][:5]
    _, probs = clf.probabilities(paths, batch_size=4, tta=mode, combine=how, engine="torch")
    views = torch.stack([tta_transform(clf.preprocessing, mode)(load_rgb(p)) for p in paths])  # [n, v, 3, H, W]
    with torch.no_grad():
        each = clf.model.eval()(views.flatten(0, 1)).softmax(-1).view(len(paths), views.shape[1], -1).double()
    expected = each.mean(1) if how == "mean" else (each.log().mean(1).exp() / each.log().mean(1).exp().sum(-1, keepdim=True))
    np.testing.assert_allclose(probs, expected.numpy(), atol=2e-5)
    _, plain = clf.probabilities(paths, batch_size=4, engine="torch")
    assert np.abs(probs - plain).max() > 1e-4  # the views are not all the plain image


def test_show_gradcam_and_feature_maps_of_chosen_images(run, tmp_path):
    image = json.loads((run / "split.json").read_text())["valid"][0]
    result = cli("show", str(run), "--gradcam", image, "--out", str(tmp_path / "cam.png"))
    assert result.returncode == 0, result.stderr
    result = cli("show", str(run), "--feature-maps", image, "--layer", "blocks.4", "--out", str(tmp_path / "maps.png"))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(tmp_path / "cam.png").size[0] > 200 and Image.open(tmp_path / "maps.png").size[0] > 200
    bad = cli("show", str(run), "--feature-maps", image, "--layer", "nope")
    assert bad.returncode == 2 and "no such module" in bad.stderr


def test_predict_writes_json(run, tmp_path):
    folder = str(Path(json.loads((run / "split.json").read_text())["valid"][0]).parent)
    result = cli("predict", str(run), folder, "--json", str(tmp_path / "p.json"), "--topk", "2")
    assert result.returncode == 0, result.stderr
    items = json.loads((tmp_path / "p.json").read_text())
    assert items and len(items[0]["top"]) == 2 and {"path", "label"} <= set(items[0])
