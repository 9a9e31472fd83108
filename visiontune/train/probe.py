"""Classic heads on frozen pooled features: an L2 logistic regression or a linear SVM, fitted by
scikit-learn with C chosen by cross-validation on the training images, then folded into timm's linear
layer so that the saved, exported and served model is the same plain network.

Why: on small data a linear model fitted to convergence with its regularisation chosen by
cross-validation is the strongest cheap baseline (the "linear probe"), and a gradient-trained head with
one fixed learning rate can fall below it (issue I: 0.94 vs 0.95 on 100 photos). `--head auto` lets the
inner validation decide between the two.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

#: C grid of the cross-validation (inverse L2 strength on standardised features): the best C on the bench
#: folders ranged 0.003-0.3; the grid spans two decades either side.
C_GRID = tuple(float(c) for c in np.logspace(-4, 1, 11))
FOLDS = 5


@dataclass
class LinearFit:
    """A fitted linear head on raw pooled features: logits = x @ weight.T + bias, one row per class."""

    weight: np.ndarray
    bias: np.ndarray
    info: dict = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def install(self, layer: nn.Linear) -> None:
        """Write the fit into the model's classifier layer (the network then predicts exactly like the fit)."""
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight.astype(np.float32)))
            layer.bias.copy_(torch.from_numpy(self.bias.astype(np.float32)))


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per feature. The scale is floored at a tenth of the median feature's: a feature almost
    constant on the training images (a unit of the backbone these images never excite) would otherwise
    multiply a new image's small activation into a logit of ~100 (seen: one image with log loss 96)."""
    mean, scale = x.mean(0), x.std(0)
    return mean, np.maximum(scale, 0.1 * float(np.median(scale)) + 1e-12)


def _folds(y: np.ndarray) -> int:
    """Stratified folds: FOLDS, fewer when the smallest class has fewer images (at least 2)."""
    smallest = int(np.bincount(y)[np.bincount(y) > 0].min())
    return max(2, min(FOLDS, smallest))


def _unscale(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray,
             present: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights on standardised features -> weights on raw features, one row per class of the run.

    A binary fit's single row z becomes the two rows (-z/2, z/2), whose softmax is sigmoid(z); classes with
    no training image get a logit far below the others."""
    weight, bias = coef / scale, intercept - (coef / scale) @ mean
    if len(present) == 2 and weight.shape[0] == 1:
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    full_w = np.zeros((n_classes, weight.shape[1]))
    full_b = np.full(n_classes, -30.0)
    full_w[present], full_b[present] = weight, bias
    return full_w, full_b


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> LinearFit:
    """Multinomial L2 logistic regression on standardised features, C by stratified K-fold log loss."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    mean, scale = _standardiser(x)
    folds = StratifiedKFold(_folds(y), shuffle=True, random_state=seed)
    jobs = _jobs(len(y))
    with warnings.catch_warnings(), _blas_threads(jobs):
        warnings.simplefilter("ignore")  # convergence notes at the weakest C: the CV score judges them
        model = LogisticRegressionCV(Cs=list(C_GRID), cv=folds, max_iter=1000, tol=1e-4, n_jobs=jobs,
                                     scoring="neg_log_loss").fit((x - mean) / scale, y)
    weight, bias = _unscale(model.coef_, model.intercept_, mean, scale, model.classes_, n_classes)
    return LinearFit(weight, bias, {"C": float(model.C_[0]), "folds": folds.n_splits, "selection": "log loss"})


def fit_svm(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> LinearFit:
    """Linear SVM (one-vs-rest squared hinge) on standardised features, C by stratified K-fold accuracy;
    its scores become probabilities through a softmax temperature fitted on the out-of-fold scores."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
    from sklearn.svm import LinearSVC

    mean, scale = _standardiser(x)
    z = (x - mean) / scale
    folds = StratifiedKFold(_folds(y), shuffle=True, random_state=seed)
    jobs = _jobs(len(y))
    with warnings.catch_warnings(), _blas_threads(jobs):
        warnings.simplefilter("ignore")
        svm = LinearSVC(dual=len(y) < x.shape[1], max_iter=2000, random_state=seed)
        search = GridSearchCV(svm, {"C": list(C_GRID[:7])}, cv=folds, n_jobs=jobs).fit(z, y)
        scores = cross_val_predict(search.best_estimator_, z, y, cv=folds, method="decision_function")
    model = search.best_estimator_
    classes = model.classes_
    if scores.ndim == 1:
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    temperature = _softmax_temperature(scores, np.searchsorted(classes, y))
    weight, bias = _unscale(model.coef_ * temperature, model.intercept_ * temperature, mean, scale,
                            classes, n_classes)
    return LinearFit(weight, bias, {"C": float(search.best_params_["C"]), "folds": folds.n_splits,
                                    "temperature": round(temperature, 4), "selection": "accuracy"})


def _softmax_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The factor t minimising the log loss of softmax(t * scores): SVM margins as calibrated probabilities."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        return -float(log_softmax(np.exp(log_t) * scores, axis=1)[np.arange(len(y)), y].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))


FITS = {"logreg": fit_logreg, "svm": fit_svm}


#: Up to this many images the folds run one after another in this process with one BLAS thread. Measured on
#: 2 cores (1,280 pooled features, 11 C values x 5 folds, 2026-12-06): 200 images 0.7 s that way, 6.8 s with
#: OpenBLAS's 2 threads (small matrices pay its thread hand-offs), 0.6 s in 2 worker processes but only after
#: ~3 s of starting them; 1,000 images 1.6 s vs 1.1 s + the start; 2,000 images 2.7 s vs 1.8 s.
SEQUENTIAL_MAX = 1000


def _jobs(n_rows: int | None = None) -> int:
    """Cross-validation folds in parallel on every core (the probe peer in bench/ does the same), except for
    few images, where starting worker processes costs more than the folds (`SEQUENTIAL_MAX`)."""
    if n_rows is not None and n_rows <= SEQUENTIAL_MAX:
        return 1
    return max(1, min(FOLDS, os.cpu_count() or 1))


def _blas_threads(n_jobs: int):
    """One BLAS thread while the folds run in this process (see SEQUENTIAL_MAX); workers set their own."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas") if n_jobs == 1 else nullcontext()
