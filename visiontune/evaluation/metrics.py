"""Classification metrics from labels and probabilities, computed by scikit-learn (not hand-rolled).

Only the expected calibration error is computed here: scikit-learn's calibration_curve is binary-only,
and the top-label ECE is a ten-line histogram.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, top-5, log loss, macro F1, per-class P/R/F1/support, confusion matrix.

    All labels of `classes` are reported, including classes absent from `y_true` (support 0).
    """
    y_true = np.asarray(y_true)
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    labels = np.arange(len(classes))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    k = min(5, len(classes) - 1)
    result = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f1[support > 0])) if (support > 0).any() else 0.0,
        "log_loss": float(log_loss(y_true, probs, labels=labels)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "confusion_matrix_normalized": np.round(
            confusion_matrix(y_true, y_pred, labels=labels, normalize="true"), 4
        ).tolist(),
    }
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        result[f"{average}_precision"], result[f"{average}_recall"], result[f"{average}_f1"] = float(p), float(r), float(f)
    if k >= 2:
        result[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, probs, k=k, labels=labels))
    present = np.unique(y_true)
    if len(present) >= 2:
        if len(classes) == 2:
            result["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        elif len(present) == len(classes):
            result["roc_auc"] = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
        onehot = np.eye(len(classes))[y_true][:, present]
        result["average_precision"] = float(average_precision_score(onehot, probs[:, present], average="macro"))
    result.update(calibration(y_true, probs))
    return result


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """Top-label expected calibration error and the reliability diagram's bins.

    ECE = sum over confidence bins of (share of images) x |accuracy - mean confidence|.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct, minlength=bins) / np.maximum(counts, 1)
    conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts / max(len(y_true), 1) * np.abs(acc - conf)))
    return {
        "ece": ece,
        "reliability": {"edges": edges.tolist(), "accuracy": acc.tolist(), "confidence": conf.tolist(), "count": counts.tolist()},
    }


def curves(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """One-vs-rest ROC and precision-recall curves per class present (binary: the positive class only)."""
    y_true = np.asarray(y_true)
    result: dict = {"roc": {}, "pr": {}}
    indices = [1] if len(classes) == 2 else range(len(classes))
    for i in indices:
        positive = y_true == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        precision, recall, _ = precision_recall_curve(positive, probs[:, i])
        result["roc"][classes[i]] = {"fpr": fpr, "tpr": tpr, "auc": float(roc_auc_score(positive, probs[:, i]))}
        result["pr"][classes[i]] = {
            "precision": precision, "recall": recall, "ap": float(average_precision_score(positive, probs[:, i]))
        }
    return result


def tune_thresholds(targets: np.ndarray, probs: np.ndarray, beta: float = 2.0, rounds: int = 2) -> np.ndarray:
    """Per-class decision thresholds maximising the sample-averaged F-beta on validation (the Planet
    competition's trick): start at 0.5, then for each class in turn pick the best of a 0.02-0.98 grid with
    the others fixed; two rounds."""
    from sklearn.metrics import fbeta_score

    thresholds = np.full(probs.shape[1], 0.5)
    grid = np.linspace(0.02, 0.98, 49)
    for _ in range(rounds):
        for c in range(probs.shape[1]):
            scores = []
            for t in grid:
                trial = thresholds.copy()
                trial[c] = t
                scores.append(fbeta_score(targets, probs >= trial, beta=beta, average="samples", zero_division=0))
            thresholds[c] = grid[int(np.argmax(scores))]
    return thresholds


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: list[str], beta: float = 2.0) -> dict:
    """Multi-label metrics at the given per-class thresholds (scikit-learn)."""
    from sklearn.metrics import accuracy_score, fbeta_score, hamming_loss

    targets = np.asarray(targets).astype(int)
    predicted = (probs >= thresholds).astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted, zero_division=0)
    per_class_fb = fbeta_score(targets, predicted, beta=beta, average=None, zero_division=0)
    present = targets.sum(0) > 0
    return {
        "n": int(len(targets)),
        f"f{beta:g}_samples": float(fbeta_score(targets, predicted, beta=beta, average="samples", zero_division=0)),
        "micro_f1": float(f1_micro(targets, predicted)),
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "subset_accuracy": float(accuracy_score(targets, predicted)),
        "hamming_loss": float(hamming_loss(targets, predicted)),
        "mean_average_precision": float(average_precision_score(targets[:, present], probs[:, present], average="macro"))
        if present.any() else 0.0,
        "thresholds": {name: float(t) for name, t in zip(classes, thresholds)},
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   f"f{beta:g}": float(per_class_fb[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
    }


def f1_micro(targets: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return f1_score(targets, predicted, average="micro", zero_division=0)
