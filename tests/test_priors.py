"""Issue J: prior shift (`predict/evaluate --prior balanced|estimate|a,b,c`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import visiontune as vt
from conftest import run_cli, write_class_folders
from visiontune.errors import ArtifactError, UsageError
from visiontune.evaluation.priors import estimate_prior, parse_prior, reweight


def gaussian_posteriors(prior: np.ndarray, n: int, seed: int = 0, assumed: np.ndarray | None = None):
    """Labels drawn with `prior` from 1-D Gaussian classes, and the exact posteriors a model trained under
    `assumed` (default: `prior`) would give."""
    rng = np.random.default_rng(seed)
    means = np.arange(len(prior), dtype=np.float64) * 1.5
    y = rng.choice(len(prior), n, p=prior)
    x = rng.normal(means[y], 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - means[None, :]) ** 2)
    assumed = prior if assumed is None else assumed
    posterior = likelihood * assumed
    return posterior / posterior.sum(1, keepdims=True), y, likelihood


def test_reweighting_is_bayes_rule():
    train, new = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.3, 0.5])
    posterior, _, likelihood = gaussian_posteriors(train, 500)
    exact = likelihood * new / (likelihood * new).sum(1, keepdims=True)
    np.testing.assert_allclose(reweight(posterior, train, new), exact, atol=1e-10)
    np.testing.assert_allclose(reweight(posterior, train, train), posterior, atol=1e-12)


def test_em_recovers_the_proportions_of_the_predicted_images():
    train, true_new = np.array([0.6, 0.3, 0.1]), np.array([0.15, 0.25, 0.6])
    posterior, y, _ = gaussian_posteriors(true_new, 20_000, assumed=train)
    estimated, steps = estimate_prior(posterior, train)
    assert np.abs(estimated - true_new).max() < 0.03 and steps > 1
    # ...and re-weighting with it beats keeping the training prior
    before = (posterior.argmax(1) == y).mean()
    after = (reweight(posterior, train, estimated).argmax(1) == y).mean()
    assert after > before + 0.02


def test_prior_text_is_checked_against_the_classes():
    assert parse_prior("balanced", ["a", "b"]) == "balanced"
    np.testing.assert_allclose(parse_prior("1,3", ["a", "b"]), [0.25, 0.75])
    with pytest.raises(UsageError, match="2 non-negative proportions, one per class in this order: a, b"):
        parse_prior("1,2,3", ["a", "b"])
    with pytest.raises(UsageError, match="balanced, estimate"):
        parse_prior("uniform", ["a", "b"])


def test_evaluate_and_predict_apply_the_prior_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_class_folders(data / "train", per_class=20, seed=0)
    write_class_folders(data / "valid", per_class=8, seed=1)
    for path in sorted((data / "train" / "blue").iterdir())[5:]:
        path.unlink()
    clf = vt.fit(data, out=tmp_path / "run", img_size=64, report=False, epochs=3, balance="none")
    prior = np.asarray(clf.extra["train_prior"])
    assert prior.argmin() == clf.classes.index("blue") and abs(prior.sum() - 1) < 1e-6

    plain = vt.evaluate(tmp_path / "run", data / "valid")
    balanced = vt.evaluate(tmp_path / "run", data / "valid", prior="balanced")
    assert "prior" not in plain and balanced["prior"]["proportions"] == [round(1 / 3, 4)] * 3
    estimated = vt.evaluate(tmp_path / "run", data / "valid", prior="estimate")
    assert estimated["prior"]["em_iterations"] >= 1
    assert abs(estimated["prior"]["proportions"][clf.classes.index("blue")] - 1 / 3) < 0.1  # valid is balanced

    out = run_cli("predict", str(tmp_path / "run"), str(data / "valid"), "--prior", "estimate", "--json", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    assert "prior: estimate (EM" in out.stderr
    assert len(json.loads((tmp_path / "p.json").read_text())) == 24
    bad = run_cli("evaluate", str(tmp_path / "run"), str(data / "valid"), "--prior", "1,2")
    assert bad.returncode != 0 and "3 non-negative proportions" in bad.stderr

    # a classifier saved before the prior was recorded: counted (+1 each) from its run's split.json
    older = vt.load(tmp_path / "run")
    del older.extra["train_prior"]
    vt.api.shift_prior(older, "balanced")
    counts = np.bincount(json.loads((tmp_path / "run" / "split.json").read_text())["train_labels"], minlength=3) + 1.0
    assert np.allclose(older.train_prior, counts / counts.sum())
    alone = vt.load(tmp_path / "run" / "classifier")
    alone.run_dir = None  # moved away from its run folder
    del alone.extra["train_prior"]
    with pytest.raises(ArtifactError, match="records no training class proportions"):
        vt.api.shift_prior(alone, "balanced")


def test_a_logit_adjusted_classifier_records_the_flattened_prior(tmp_path):
    from visiontune.train.balance import class_prior
    from visiontune.train.plan import Plan
    from visiontune.pipeline.finish import effective_prior

    y = np.r_[np.zeros(80, int), np.ones(20, int)]
    plan = Plan.__new__(Plan)
    plan.balance, plan.balance_tau = "logit-adjust", 1.0
    np.testing.assert_allclose(effective_prior(plan, y, 2), [0.5, 0.5])
    plan.balance_tau = 0.0
    np.testing.assert_allclose(effective_prior(plan, y, 2), class_prior(y, 2))
