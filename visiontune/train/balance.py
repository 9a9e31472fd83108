"""Imbalanced classes: post-hoc logit adjustment, folded into the classifier's biases.

A classifier trained on imbalanced data learns the training prior: a rare class is predicted only when
the evidence is overwhelming, so its recall suffers (issue I: a defect class at 31 % had recall 0.64).
Subtracting tau * log(prior) from the logits (Menon et al. 2021, "Long-tail learning via logit
adjustment") turns the model towards the balanced error; tau = 1 is Bayes-optimal for a calibrated model,
and tau is chosen on images carved from the training data when the run holds some out. Unlike class
weights or a balanced sampler it needs no retraining, so it can be chosen, and the choice costs nothing
at prediction time: the shift is a change of the output layer's bias.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_TAU = 1.0  # without selection images: the Bayes-optimal shift for a calibrated model


def class_prior(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Training class frequencies (add-one smoothed: a class without images gets a small prior, not 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64) + 1.0
    return counts / counts.sum()


def adjusted(logits: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    return logits - tau * np.log(prior)


def best_tau(logits: np.ndarray, y: np.ndarray, prior: np.ndarray) -> tuple[float, dict[float, float]]:
    """The tau with the best balanced accuracy on labelled rows (ties: the smallest shift)."""
    from sklearn.metrics import balanced_accuracy_score

    scores = {tau: float(balanced_accuracy_score(y, adjusted(logits, prior, tau).argmax(1))) for tau in TAUS}
    return max(scores, key=lambda tau: (scores[tau], -tau)), scores


def shift_bias(layer: nn.Linear, prior: np.ndarray, tau: float) -> None:
    """Fold the adjustment into the output layer: bias_c -= tau * log(prior_c)."""
    with torch.no_grad():
        layer.bias.sub_(torch.from_numpy((tau * np.log(prior)).astype(np.float32)))
