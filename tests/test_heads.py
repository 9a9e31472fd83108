"""Issue I §3: classifier heads (`--head linear|logreg|svm|mlp|auto`) and imbalanced data (`--balance`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import visiontune as vt
from conftest import write_class_folders
from visiontune.backbones.heads import MLPHead
from visiontune.train.balance import best_tau, class_prior, shift_bias
from visiontune.train.head_choice import clearly_better
from visiontune.train.probe import fit_logreg, fit_svm


def blobs(n_per_class: int, n_classes: int, dim: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + rng.normal(0, 1.5, (len(y), dim)), y


@pytest.mark.parametrize("fit", [fit_logreg, fit_svm], ids=["logreg", "svm"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_a_fitted_head_predicts_the_same_inside_the_network_layer(fit, n_classes):
    x, y = blobs(40, n_classes)
    head = fit(x, y, n_classes + 1)  # one class of the run has no training image
    layer = nn.Linear(x.shape[1], n_classes + 1)
    head.install(layer)
    logits = layer(torch.from_numpy(x).float()).detach().numpy()
    np.testing.assert_allclose(logits, head.logits(x), rtol=1e-4, atol=1e-3)
    assert (logits.argmax(1) == y).mean() > 0.9
    assert (logits.argmax(1) != n_classes).all()  # the class without images is never predicted
    assert head.info["C"] > 0 and head.info["folds"] >= 2


def test_a_binary_logistic_regression_keeps_its_probabilities_as_a_two_row_softmax():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(50, 2)
    head = fit_logreg(x, y, 2)
    mean, scale = x.mean(0), x.std(0)
    reference = LogisticRegression(C=head.info["C"], max_iter=2000).fit((x - mean) / scale, y)
    ours = torch.from_numpy(head.logits(x)).softmax(-1).numpy()[:, 1]
    np.testing.assert_allclose(ours, reference.predict_proba((x - mean) / scale)[:, 1], atol=2e-3)


def test_a_feature_the_training_images_never_excite_cannot_blow_up_a_new_images_logits():
    x, y = blobs(30, 3)
    x[:, 0] = 0.0
    x[0, 0] = 1e-6  # almost constant on the training images
    head = fit_logreg(x, y, 3)
    probe = x[:3].copy()
    probe[:, 0] = 5.0  # a new image excites it
    assert np.abs(head.logits(probe)).max() < 50


def test_the_probe_must_win_clearly_to_replace_the_plans_recipe():
    assert not clearly_better(0.85, 0.8375, 80)  # one image of 80: noise
    assert clearly_better(0.95, 0.80, 80)
    assert not clearly_better(0.80, 0.80, 10_000)


def test_logit_adjustment_raises_the_rare_class_recall_and_folds_into_the_bias():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(900, int), np.ones(100, int)]
    evidence = rng.normal(0, 1, 1000) + 1.2 * y
    prior = class_prior(y, 2)
    logits = np.stack([np.zeros(1000), evidence - 1.2 / 2 + np.log(prior[1] / prior[0])], 1)  # calibrated, prior-aware
    tau, scores = best_tau(logits, y, prior)
    assert tau > 0 and scores[tau] > scores[0.0] + 0.05
    layer = nn.Linear(3, 2)
    before = layer.bias.detach().clone()
    shift_bias(layer, prior, tau)
    assert torch.allclose(layer.bias - before, torch.from_numpy(-tau * np.log(prior)).float())


def split_folders(root, per_class=14, scarce: dict[str, int] | None = None):
    write_class_folders(root / "train", per_class=per_class, seed=0)
    write_class_folders(root / "valid", per_class=6, seed=1)
    for name, keep in (scarce or {}).items():
        for path in sorted((root / "train" / name).iterdir())[keep:]:
            path.unlink()
    return root


def test_logreg_head_keeps_the_pretrained_blocks_and_the_saved_classifier_predicts_like_the_run(tmp_path):
    data = split_folders(tmp_path / "data")
    clf = vt.fit(data, out=tmp_path / "run", img_size=64, report=False, head="logreg")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["head"] == "logreg" and plan["why"]["head"] == "set by you"
    meta = json.loads((tmp_path / "run" / "classifier" / "classifier.json").read_text())
    assert meta["head_fit"]["head"] == "logreg" and meta["head_fit"]["C"] > 0
    from visiontune.backbones.registry import create_backbone

    fresh = create_backbone("tf_efficientnet_lite0", num_classes=3).model.state_dict()
    trained = clf.model.state_dict()
    assert all(torch.equal(fresh[k], trained[k]) for k in fresh if not k.startswith("classifier"))
    assert not torch.equal(fresh["classifier.weight"], trained["classifier.weight"])
    loaded = vt.load(tmp_path / "run")
    paths = sorted((data / "valid").rglob("*.png"))
    assert [p.label for p in loaded.predict(paths)] == [p.label for p in clf.predict(paths)]
    assert clf.metrics["accuracy"] > 0.9


def test_mlp_head_trains_saves_loads_and_exports(tmp_path):
    data = split_folders(tmp_path / "data")
    clf = vt.fit(data, out=tmp_path / "run", img_size=64, report=False, head="mlp", epochs=4)
    assert isinstance(clf.model.get_classifier(), MLPHead)
    meta = json.loads((tmp_path / "run" / "classifier" / "classifier.json").read_text())
    assert meta["head"] == "mlp" and meta["head_hidden"] == clf.model.get_classifier().hidden
    loaded = vt.load(tmp_path / "run")
    assert isinstance(loaded.model.get_classifier(), MLPHead)
    paths = sorted((data / "valid").rglob("*.png"))
    a = np.array([p.probs[0] for p in clf.predict(paths)])
    b = np.array([p.probs[0] for p in loaded.predict(paths)])
    np.testing.assert_allclose(a, b, atol=1e-5)
    from visiontune.api import export

    exported = export(tmp_path / "run", out=tmp_path / "model.onnx")
    assert exported.path.exists() and exported.parity["ok"]


def test_auto_head_records_both_scores_and_what_it_chose(tmp_path):
    data = split_folders(tmp_path / "data")
    vt.fit(data, out=tmp_path / "run", img_size=64, report=False, epochs=3)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["head"] in ("linear", "logreg")
    assert plan["why"]["head"].startswith("auto: ") and "linear accuracy" in plan["why"]["head"] and "logreg accuracy" in plan["why"]["head"]
    assert "the run then trains on every training image" in plan["why"]["selection"]


def test_imbalanced_data_is_named_in_the_plan_and_acted_on(tmp_path):
    data = split_folders(tmp_path / "data", per_class=20, scarce={"blue": 6})
    clf = vt.fit(data, out=tmp_path / "run", img_size=64, report=False, epochs=3)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["balance"] == "logit-adjust" and "imbalanced: smallest class" in plan["why"]["balance"]
    assert plan["balance_tau"] in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    assert "selection images" in plan["why"]["balance_tau"]
    assert "balanced_accuracy" in clf.metrics
    balanced = split_folders(tmp_path / "even")
    vt.fit(balanced, out=tmp_path / "even-run", img_size=64, report=False, epochs=2, head="linear")
    assert json.loads((tmp_path / "even-run" / "plan.json").read_text())["balance"] == "none"


def test_multilabel_data_refuses_heads_that_fit_one_class_per_image(tmp_path):
    from test_multilabel import write_tagged
    from visiontune.errors import UsageError

    root = write_tagged(tmp_path / "data", n=24)
    with pytest.raises(UsageError, match="multi-label"):
        vt.fit(root, labels=root / "labels.csv", out=tmp_path / "run", img_size=64, report=False, head="logreg")


def test_auto_that_keeps_the_plans_tail_trains_exactly_the_model_linear_trains(tmp_path):
    data = split_folders(tmp_path / "data")
    auto = vt.fit(data, out=tmp_path / "auto", img_size=64, report=False, epochs=3)
    assert json.loads((tmp_path / "auto" / "plan.json").read_text())["head"] == "linear"  # both near 1.0: no clear win
    linear = vt.fit(data, out=tmp_path / "linear", img_size=64, report=False, epochs=3, head="linear")
    a, b = auto.model.state_dict(), linear.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the trials consumed no random number of the run
