"""Semi-supervised learning and domain adaptation (issue F) on small synthetic folders: every method trains
through `visiontune.fit`, uses the unlabelled / target images (its weights change when they change), leaves
the labelled-only path alone, and never reads the target's evaluation labels while training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import visiontune as vt
from visiontune import cli
from visiontune.adapt.coral import coral_distance
from visiontune.adapt.dann import GradientReversal
from visiontune.adapt.mmd import mmd2
from visiontune.adapt.subspace import fit_jda, fit_tca
from visiontune.errors import UsageError
from conftest import COLOURS, make_image, write_class_folders

FAST = {"img_size": 64, "epochs": 2, "extra_epochs": 1, "report": False, "cut": "pooled"}
SHIFTED = {name: tuple(int(0.5 * c + 60) for c in colour) for name, colour in COLOURS.items()}


def _flat(folder, classes, per_class, seed):
    """Unlabelled images of `classes` colours, flat in one folder (no class sub-folders)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(per_class * len(classes)):
        name = list(classes)[i % len(classes)]
        make_image(classes[name], rng).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond")
    FAST["cache_dir"] = str(root / "cache")  # one feature cache for the module: each folder is cached once
    return {
        "labelled": write_class_folders(root / "labelled", per_class=8),
        "unlabelled": _flat(root / "unlabelled", COLOURS, 12, seed=1),
        "other_unlabelled": _flat(root / "other_unlabelled", COLOURS, 12, seed=5),
        "target": _flat(root / "target", SHIFTED, 12, seed=2),
        "other_target": _flat(root / "other_target", SHIFTED, 12, seed=6),
        "target_eval": write_class_folders(root / "target_eval", per_class=6, seed=3, classes=SHIFTED),
    }


def _weights(run):
    return load_file(str(run / "classifier" / "model.safetensors"))


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["pseudo", "pi", "mean-teacher", "fixmatch", "cotrain", "self-train"])
def test_each_ssl_method_learns_from_the_unlabelled_images(folders, tmp_path, method):
    clf = vt.fit(folders["labelled"], out=tmp_path / "a", unlabeled=folders["unlabelled"], ssl=method, threshold=0.5, **FAST)
    vt.fit(folders["labelled"], out=tmp_path / "b", unlabeled=folders["other_unlabelled"], ssl=method, threshold=0.5, **FAST)
    assert clf.metrics["beyond"]["method"] == method and clf.metrics["beyond"]["extra_images"] == 36
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))  # other unlabelled images, other model
    records = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert f":{method}\"" in records and ":warm\"" in records
    assert ("pseudo-labels" if method == "self-train" else "train_unlabelled_loss") in records


@pytest.mark.parametrize("method", ["coral", "coral-cut", "coral-cut+self-train", "mmd", "dann", "self-train", "tca", "jda"])
def test_each_adaptation_method_uses_the_target_images(folders, tmp_path, method):
    kw = {"adapt": method, "target_labels": folders["target_eval"], "threshold": 0.5, **FAST}
    clf = vt.fit(folders["labelled"], out=tmp_path / "a", target=folders["target"], **kw)
    vt.fit(folders["labelled"], out=tmp_path / "b", target=folders["other_target"], **kw)
    assert 0 <= clf.metrics["target_accuracy"] <= 1 and clf.metrics["beyond"]["method"] == method
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    picture = json.loads((tmp_path / "a" / "adaptation.json").read_text())
    if method.startswith("coral-cut") or method in ("tca", "jda"):  # the after-picture: what the classifier reads
        assert picture["after"]["mean_shift"] < picture["before"]["mean_shift"]  # (re-coloured source, projection)


def test_without_extra_images_the_labelled_path_is_untouched(folders, tmp_path):
    plain = vt.fit(folders["labelled"], out=tmp_path / "plain", **FAST)
    assert "beyond" not in plain.metrics
    records = (tmp_path / "plain" / "metrics.jsonl").read_text()
    assert "warm" not in records and "unlabelled" not in records
    again = vt.fit(folders["labelled"], out=tmp_path / "again", **FAST)
    assert _same(_weights(tmp_path / "plain"), _weights(tmp_path / "again"))


def test_target_evaluation_labels_are_never_read_in_training(folders, tmp_path):
    """Poison the target labels (every image moved to another class folder): same weights, other score."""
    poisoned = tmp_path / "poisoned"
    names = sorted(SHIFTED)
    for k, name in enumerate(names):
        shutil.copytree(folders["target_eval"] / name, poisoned / names[(k + 1) % len(names)], dirs_exist_ok=True)
    for target_labels, out in ((folders["target_eval"], "run-clean"), (poisoned, "run-poisoned")):
        vt.fit(folders["labelled"], out=tmp_path / out, target=folders["target"], target_labels=target_labels,
               adapt="auto", **FAST)
    assert _same(_weights(tmp_path / "run-clean"), _weights(tmp_path / "run-poisoned"))
    clean = vt.load(tmp_path / "run-clean").metrics["target_accuracy"]
    assert clean != vt.load(tmp_path / "run-poisoned").metrics["target_accuracy"]
    assert (tmp_path / "run-clean" / "auto.json").read_text() == (tmp_path / "run-poisoned" / "auto.json").read_text()


def test_adapt_auto_skips_a_method_the_target_cannot_support(folders, tmp_path):
    """One target image: coral-cut (a covariance) cannot run; auto says so and chooses among the rest."""
    one = tmp_path / "one_target"
    one.mkdir()
    shutil.copy(sorted(folders["target"].iterdir())[0], one)
    vt.fit(folders["labelled"], out=tmp_path / "run", target=one, adapt="auto", **FAST)
    auto = json.loads((tmp_path / "run" / "auto.json").read_text())
    assert set(auto["skipped"]) == {"coral-cut", "coral-cut+self-train"} and "2 target images" in auto["skipped"]["coral-cut"]
    assert auto["chosen"] in auto["scores"] and "coral-cut" not in auto["scores"]
    assert auto["held_out_target_images"] == 1  # one image: scored on itself, and the run warns


def test_adapt_auto_scores_target_images_no_trial_trained_on(folders, tmp_path, monkeypatch):
    """The criterion reads 20 % of the target images that every trial's training left out (self-training
    scored on the images it pseudo-labelled looks as consistent as its labelling is confident)."""
    from visiontune import beyond

    trained_on, scored = [], []
    train, score = beyond.train_candidate, beyond.mixval_inter

    def spy_train(tail, cand, views, y, vx, vy, extra, *args, **kwargs):
        trained_on.append({row.tobytes() for row in np.asarray(extra.views[0])})
        return train(tail, cand, views, y, vx, vy, extra, *args, **kwargs)

    def spy_score(probabilities, rows, seed, **kwargs):
        scored.append({row.tobytes() for row in np.asarray(rows)})
        return score(probabilities, rows, seed, **kwargs)

    monkeypatch.setattr(beyond, "train_candidate", spy_train)
    monkeypatch.setattr(beyond, "mixval_inter", spy_score)
    vt.fit(folders["labelled"], out=tmp_path / "run", target=folders["target"], adapt="auto", **FAST)
    n = len(list(folders["target"].iterdir()))
    trials = trained_on[:len(scored)]  # the last call trains the chosen method on every target image
    assert len(scored) >= 8 and all(len(s) == n // 5 for s in scored) and all(len(t) == n - n // 5 for t in trials)
    assert all(not (s & t) for s, t in zip(scored, trials))
    assert len(trained_on[-1]) == n


def test_adapt_run_scores_the_source_only_yardstick_without_touching_its_model(folders, tmp_path):
    """With labelled target images an adaptation run also scores what the same data and plan give without
    adapting: exactly an `--adapt none` run's target accuracy, while the adapted weights stay those of the
    run without target labels (the yardstick trains in a forked random state and is then undone)."""
    runs = {name: tmp_path / name for name in ("tca", "tca-no-labels", "none")}
    vt.fit(folders["labelled"], out=runs["tca"], target=folders["target"], target_labels=folders["target_eval"],
           adapt="tca", **{**FAST, "report": True})
    vt.fit(folders["labelled"], out=runs["tca-no-labels"], target=folders["target"], adapt="tca", **FAST)
    vt.fit(folders["labelled"], out=runs["none"], target=folders["target"], target_labels=folders["target_eval"],
           adapt="none", **FAST)
    assert _same(_weights(runs["tca"]), _weights(runs["tca-no-labels"]))
    adapted, none = (json.loads((runs[n] / "adaptation.json").read_text()) for n in ("tca", "none"))
    assert adapted["source_only"]["accuracy"] == none["target"]["accuracy"] and "source_only" not in none
    assert adapted["source_only"]["method_minus_source_only"] == adapted["target"]["accuracy"] - none["target"]["accuracy"]
    assert adapted["source_only"]["worse_than_not_adapting"] == (
        adapted["target"]["accuracy"] < none["target"]["accuracy"] - 0.01)
    assert "source-only (the same data and plan without adaptation)" in (runs["tca"] / "report.html").read_text()


def test_ssl_auto_chooses_without_validation_labels(folders, tmp_path):
    """A train/valid layout whose valid labels are poisoned gives the same choice and the same weights."""
    for poison in (False, True):
        data = tmp_path / f"split-{poison}"
        shutil.copytree(folders["labelled"], data / "train")
        names = sorted(COLOURS)
        for k, name in enumerate(names):
            shutil.copytree(folders["labelled"] / name,
                            data / "valid" / (names[(k + 1) % 3] if poison else name), dirs_exist_ok=True)
        vt.fit(data, out=tmp_path / f"run-{poison}", unlabeled=folders["unlabelled"], ssl="auto", **FAST)
    assert _same(_weights(tmp_path / "run-False"), _weights(tmp_path / "run-True"))
    assert (tmp_path / "run-False" / "auto.json").read_text() == (tmp_path / "run-True" / "auto.json").read_text()


def test_cli_and_doctor(folders, tmp_path, capsys):
    code = cli.main(["train", str(folders["labelled"]), "--out", str(tmp_path / "run"), "--unlabeled",
                     str(folders["unlabelled"]), "--ssl", "pseudo", "--img-size", "64", "--epochs", "2", "--cut", "pooled",
                     "--extra-epochs", "1", "--no-report", "--cache-dir", FAST["cache_dir"]])
    assert code == 0
    report = vt.api.doctor(folders["labelled"], target=folders["target"])
    assert 0 <= report.domain["proxy_a_distance"] <= 2
    assert any(check == "domain distance" for check, _ in report.rows)


def test_refused_requests_say_what_to_do(folders, tmp_path):
    with pytest.raises(UsageError, match="--unlabeled"):
        vt.fit(folders["labelled"], out=tmp_path / "a", ssl="fixmatch", **FAST)
    with pytest.raises(UsageError, match="choose from"):
        vt.fit(folders["labelled"], out=tmp_path / "b", unlabeled=folders["unlabelled"], ssl="magic", **FAST)


def test_discrepancies_measure_shift():
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=rng), torch.randn(200, 8, generator=rng)
    shifted = b * 2 + 1
    assert mmd2(a, shifted) > 5 * mmd2(a, b)
    assert coral_distance(a, shifted) > 5 * coral_distance(a, b)
    x = torch.ones(3, requires_grad=True)
    GradientReversal.apply(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))


def test_subspace_projections_fold_into_a_linear_classifier():
    rng = np.random.default_rng(0)
    xs, xt, ys = rng.normal(size=(120, 20)), rng.normal(size=(80, 20)) + 2, rng.integers(0, 3, 120)
    for projection in (fit_tca(xs, xt, 5), fit_jda(xs, ys, xt, 5, iterations=2)):
        weight, bias = rng.normal(size=(3, 20)), rng.normal(size=3)
        folded_w, folded_b = projection.fold(weight, bias)
        assert np.allclose(projection.padded(xt, 20) @ weight.T + bias, xt @ folded_w.T + folded_b, atol=1e-4)
        # the projected domains are closer than the raw ones (their mean gap shrinks)
        raw_gap = np.linalg.norm(xs.mean(0) - xt.mean(0)) / xs.std()
        projected_gap = np.linalg.norm(projection(xs).mean(0) - projection(xt).mean(0)) / projection(xs).std()
        assert projected_gap < raw_gap


@pytest.mark.parametrize("shape", [(6,), (5, 2, 3)])
def test_recolouring_gives_source_rows_the_target_statistics(shape):
    """coral-cut: re-coloured source rows have the target's mean and covariance at every position (no
    shrinkage), and shrinkage only pulls the covariance towards the diagonal."""
    from visiontune.adapt.coral_cut import _positions, fit_recolouring

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(shape[0], shape[0]))
    source = rng.normal(size=(400, *shape)).astype(np.float32)
    target = (np.einsum("nc...,cd->nd...", rng.normal(size=(300, *shape)), mixing) * 3 + 2).astype(np.float32)
    moved = _positions(fit_recolouring(source, target, shrink=0.0)(source))
    wanted = _positions(target)
    for p in range(len(moved)):
        assert np.allclose(moved[p].mean(0), wanted[p].mean(0), atol=1e-3)
        assert np.allclose(np.cov(moved[p], rowvar=False), np.cov(wanted[p], rowvar=False), atol=1e-2 * np.abs(np.cov(wanted[p], rowvar=False)).max())
    with pytest.raises(UsageError, match="at least 2 target images"):  # one image has no covariance (NaN weights)
        fit_recolouring(source, target[:1])
    shrunk = _positions(fit_recolouring(source, target, shrink=1.0)(source))
    assert np.allclose(shrunk[0].mean(0), wanted[0].mean(0), atol=1e-3)
    off_diagonal = lambda c: np.abs(c - np.diag(np.diag(c))).sum() / np.abs(np.diag(c)).sum()
    assert off_diagonal(np.cov(shrunk[0], rowvar=False)) < off_diagonal(np.cov(wanted[0], rowvar=False))


def test_mixval_prefers_a_boundary_between_the_target_clusters():
    """Two target clusters: a model whose boundary lies between them keeps the dominant image's label on
    0.55 : 0.45 mixes; one whose boundary cuts a cluster in half flips about half of them; one that gives
    every image one class has no pair to probe and scores 0."""
    from visiontune.beyond import mixval_inter

    rng = np.random.default_rng(0)
    target = np.vstack([rng.normal(size=(200, 2)) * 0.1 + [-3, 0], rng.normal(size=(200, 2)) * 0.1 + [3, 0]])

    def boundary_at(x0: float):
        def probabilities(rows: np.ndarray) -> np.ndarray:
            right = 1 / (1 + np.exp(-10 * (rows[:, 0] - x0)))
            return np.stack([1 - right, right], 1)
        return probabilities

    between, through = mixval_inter(boundary_at(0.0), target, seed=0), mixval_inter(boundary_at(3.0), target, seed=0)
    assert between > 0.95 and through < 0.75
    assert mixval_inter(boundary_at(100.0), target, seed=0) == 0.0
    assert mixval_inter(boundary_at(3.0), target, seed=0) == through  # seeded: the same pairs every time
