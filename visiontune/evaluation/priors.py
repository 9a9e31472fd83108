"""Prior shift: the images being predicted may have other class proportions than the training images.

A classifier's probabilities carry its training prior: p(y|x) ∝ p(x|y) π_train(y). When the images being
predicted come with other proportions π_new (a balanced test set after imbalanced training, a season with
more of one class), Bayes' rule gives p_new(y|x) ∝ p(y|x) π_new(y) / π_train(y) — no retraining needed.
`--prior balanced` uses a uniform π_new, `--prior a,b,c` yours, and `--prior estimate` estimates π_new from
the unlabelled images being predicted with the EM procedure of Saerens, Latinne & Decaestecker (2002):
alternately re-weight the posteriors by the current estimate and take their mean as the next estimate.
"""

from __future__ import annotations

import numpy as np

from visiontune.errors import UsageError

PRIOR_CHOICES = "balanced, estimate, or comma-separated proportions (one per class)"


def parse_prior(text: str, classes: list[str]) -> str | np.ndarray:
    """'balanced' | 'estimate' | 'a,b,c' (any positive numbers, normalised; one per class, in class order)."""
    if text in ("balanced", "estimate"):
        return text
    try:
        values = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise UsageError(f"--prior {text!r}: use {PRIOR_CHOICES} (classes: {', '.join(classes)})") from None
    if len(values) != len(classes) or (values < 0).any() or values.sum() <= 0:
        raise UsageError(f"--prior {text!r}: give {len(classes)} non-negative proportions, one per class in this "
                         f"order: {', '.join(classes)}")
    return values / values.sum()


def reweight(probs: np.ndarray, train_prior: np.ndarray, new_prior: np.ndarray) -> np.ndarray:
    """Posteriors under `new_prior` from posteriors under `train_prior` (Bayes' rule, rows renormalised)."""
    weighted = probs * (np.asarray(new_prior) / np.asarray(train_prior))[None, :]
    return weighted / np.clip(weighted.sum(1, keepdims=True), 1e-300, None)


def estimate_prior(probs: np.ndarray, train_prior: np.ndarray, iterations: int = 200, tol: float = 1e-7) -> tuple[np.ndarray, int]:
    """(the class proportions of the predicted images, EM iterations used): Saerens et al. 2002."""
    prior = np.asarray(train_prior, dtype=np.float64)
    for step in range(1, iterations + 1):
        updated = reweight(probs, train_prior, prior).mean(0)
        if np.abs(updated - prior).max() < tol:
            return updated, step
        prior = updated
    return prior, iterations


def resolve(choice: str | np.ndarray, probs_for_estimate, train_prior: np.ndarray) -> tuple[np.ndarray, dict]:
    """The new prior a choice names, and what to report about it. `probs_for_estimate()` is called only for
    `estimate` (it runs the model over the images once)."""
    if isinstance(choice, np.ndarray):
        return choice, {"prior": "given", "proportions": choice.round(4).tolist()}
    if choice == "balanced":
        uniform = np.full(len(train_prior), 1.0 / len(train_prior))
        return uniform, {"prior": "balanced", "proportions": uniform.round(4).tolist()}
    estimated, steps = estimate_prior(probs_for_estimate(), train_prior)
    return estimated, {"prior": "estimate", "proportions": estimated.round(4).tolist(), "em_iterations": steps}
