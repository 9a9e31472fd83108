"""The report sections of a multi-label run (the Kaggle Planet case): per-tag thresholds and scores, and
the images whose tags the model gets most wrong, by the tag.

A multi-label mistake is not one wrong class but a tag too many (a false positive) or a tag missed (a
false negative), so the interpretation lists are per (image, tag) pair, next to whole-image top losses.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import multilabel_confusion_matrix

from visiontune.classifier import Classifier
from visiontune.evaluation.metrics import calibration, curves, multilabel_metrics
from visiontune.report import plots
from visiontune.task.kinds import thresholds as saved_thresholds
from visiontune.report.parts import class_counts, figure_html, gradcam_section, table_html, thumbnails

MULTILABEL_SECTIONS = {
    "summary": "Summary",
    "plan": "Plan",
    "data": "Data",
    "training": "Training curves",
    "metrics": "Metrics per tag",
    "curves": "ROC and precision-recall",
    "calibration": "Calibration",
    "interpretation": "Interpretation",
    "gradcam": "Grad-CAM",
    "network": "Inside the network",
}


def _tags(row: np.ndarray, classes: list[str]) -> str:
    return " ".join(classes[i] for i in np.flatnonzero(row)) or "(none)"


def image_losses(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy of each image over its tags (what training minimised)."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(axis=1)


def every_tag_right(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per image: is every tag decided right at the thresholds (the images behind subset accuracy)?"""
    return ((probs >= thresholds) == targets.astype(bool)).all(axis=1)


def worst_pairs(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, positive: bool, k: int) -> list[tuple[int, int]]:
    """The k wrong (image, tag) decisions the model is most sure of: false tags (positive=False: absent, yet
    p >= the tag's threshold), highest probability first; or misses (positive=True: present, yet p below
    it), lowest probability first."""
    if positive:
        score = np.where((targets == 1) & (probs < thresholds), -probs, -np.inf)
    else:
        score = np.where((targets == 0) & (probs >= thresholds), probs, -np.inf)
    flat = np.argsort(-score, axis=None, kind="stable")[:k]
    return [divmod(int(i), probs.shape[1]) for i in flat if np.isfinite(score.flat[i])]


def uncertain_pairs(probs: np.ndarray, thresholds: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k (image, tag) pairs whose probability is closest to the tag's decision threshold."""
    flat = np.argsort(np.abs(probs - thresholds), axis=None, kind="stable")[:k]
    return [divmod(int(i), probs.shape[1]) for i in flat]


def multilabel_sections(classifier: Classifier, data: dict) -> tuple[list[list], dict[str, str]]:
    """(summary rows, HTML of the sections particular to a multi-label run)."""
    classes = classifier.classes
    probs, targets, paths = data["probs"], np.asarray(data["labels"]), data["paths"]
    beta = float(classifier.extra.get("fbeta", 2.0))
    thresholds = saved_thresholds(classifier.extra, len(classifier.classes))
    metrics = multilabel_metrics(targets, probs, thresholds, classes, beta)
    at_half = multilabel_metrics(targets, probs, np.full(len(classes), 0.5), classes, beta)
    key = f"f{beta:g}_samples"
    summary = [
        ["validation images", metrics["n"]],
        [f"F{beta:g} (samples), tuned thresholds", f"{metrics[key]:.4f}"],
        [f"F{beta:g} (samples), all thresholds 0.5", f"{at_half[key]:.4f}"],
        ["micro F1", f"{metrics['micro_f1']:.4f}"], ["macro F1", f"{metrics['macro_f1']:.4f}"],
        ["subset accuracy (every tag right)", f"{metrics['subset_accuracy']:.4f}"],
        ["Hamming loss", f"{metrics['hamming_loss']:.4f}"],
        ["mean average precision", f"{metrics['mean_average_precision']:.4f}"],
    ]
    body: dict[str, str] = {}
    body["data"] = figure_html(plots.plot_class_distribution, class_counts(data["split"], classes, "tags")) + (
        f"<p>tags per image (validation): mean {targets.sum(1).mean():.2f}, max {int(targets.sum(1).max())}</p>")

    # per tag: scores at the tuned threshold, the counts behind them, and the threshold itself
    confusion = multilabel_confusion_matrix(targets, (probs >= thresholds).astype(int))
    tag_curves = {"roc": {}, "pr": {}}
    for i, name in enumerate(classes):  # one binary problem per tag; curves() of it has the positive class
        binary = curves(targets[:, i], np.stack([1 - probs[:, i], probs[:, i]], axis=1), ["absent", name])
        tag_curves["roc"].update(binary["roc"])
        tag_curves["pr"].update(binary["pr"])
    rows = []
    for i, name in enumerate(classes):
        c, ((_, fp), (fn, tp)) = metrics["per_class"][name], confusion[i]
        ap = tag_curves["pr"].get(name, {}).get("ap")
        rows.append([name, f"{thresholds[i]:.2f}", f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c[f'f{beta:g}']:.3f}",
                     f"{ap:.3f}" if ap is not None else "", tp, fp, fn, c["support"]])
    body["metrics"] = table_html(
        ["tag", "threshold", "precision", "recall", f"F{beta:g}", "AP", "true pos.", "false pos.", "missed", "support"], rows
    ) + f"<p>Thresholds were tuned on these validation images for F{beta:g}, per tag.</p>"
    body["curves"] = figure_html(plots.plot_roc_pr, tag_curves) if tag_curves["roc"] else "<p>needs tags both present and absent</p>"
    # calibration of every (image, tag) decision: is "p = 0.8" right 80 % of the time?
    pairs = calibration(targets.ravel(), np.stack([1 - probs.ravel(), probs.ravel()], axis=1))
    body["calibration"] = figure_html(plots.plot_reliability, pairs["reliability"], pairs["ece"]) + (
        "<p>Over every (image, tag) pair: confidence = max(p, 1 - p) of the tag decision at 0.5.</p>")

    predicted = probs >= thresholds
    losses = image_losses(targets, probs)
    top = np.argsort(-losses)[:16]
    all_right = every_tag_right(targets, probs, thresholds)
    exact, wrong = np.flatnonzero(all_right), np.flatnonzero(~all_right)
    rng = np.random.default_rng(0)

    def whole(indices) -> tuple[list[str], list[str]]:
        return ([paths[i] for i in indices],
                [f"true: {_tags(targets[i], classes)}\npred: {_tags(predicted[i], classes)}\nloss={losses[i]:.2f}" for i in indices])

    def by_tag(pairs_: list[tuple[int, int]]) -> tuple[list[str], list[str]]:
        return [paths[i] for i, _ in pairs_], [
            f"{classes[t]} ({'labelled' if targets[i, t] else 'not labelled'})\np={probs[i, t]:.2f}, threshold {thresholds[t]:.2f}"
            for i, t in pairs_]

    body["interpretation"] = "".join([
        thumbnails(*whole(rng.choice(exact, min(8, len(exact)), replace=False) if len(exact) else []),
                   "a few with every tag right, at random"),
        thumbnails(*whole(rng.choice(wrong, min(8, len(wrong)), replace=False) if len(wrong) else []),
                   "a few with a tag wrong, at random"),
        thumbnails(*by_tag(worst_pairs(targets, probs, thresholds, positive=False, k=16)),
                   "most confident false tags (a tag the image does not have, over its threshold; highest probability first)"),
        thumbnails(*by_tag(worst_pairs(targets, probs, thresholds, positive=True, k=16)),
                   "most confident misses (a tag the image has, under its threshold; lowest probability first)"),
        thumbnails(*by_tag(uncertain_pairs(probs, thresholds, k=16)),
                   "most uncertain tags (probability closest to the tag's threshold)"),
        thumbnails(*whole(top), "top losses (mean binary cross-entropy over the tags)"),
    ])
    body["gradcam"] = gradcam_section(
        classifier, [paths[i] for i in top[:8]], [f"true {_tags(targets[i], classes)}" for i in top[:8]],
        "Top losses: each image, then where the evidence for its highest-scoring tag is.")
    return summary, body
