"""Transfer component analysis (TCA, Pan et al. 2011) and joint distribution adaptation (JDA, Long et al.
2013): closed-form projections of pooled features into a subspace where source and target are close.

Both are solved in the primal with a linear kernel on the top 256 principal components of both domains
— a 256 x 256 generalised eigenproblem instead of the papers' (n_s + n_t)^2 kernel matrix — so they take
a fraction of a second on thousands of images and give a linear map. The classifier is trained on the projected features (padded with zeros to
the backbone's width) and then folded back: logits = W' x + b' on the original features, so the saved
classifier is a plain timm model that needs no extra layer to predict.

TCA keeps the directions of largest variance of both domains together (the centring matrix H) while the
distance between the domain means (MMD with a linear kernel, matrix L) stays small; ``mu`` (1.0, the
papers' default scale) trades the two. JDA adds, for each class, the distance between the source class
mean and the mean of the target images pseudo-labelled that class, re-estimating the pseudo-labels
``iterations`` (10 in the paper; 5 here, where it has converged on the bench) times with a logistic
regression in the subspace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.linalg import eigh
from sklearn.linear_model import LogisticRegression

from visiontune.backbones.cuts import POOLED, Tail
from visiontune.train.extra_methods import Candidate, Extra, ExtraMethod, register_method
from visiontune.train.phases import pooled_features, train_cached
from visiontune.train.plan import Plan

MAX_PER_DOMAIN = 2000  # rows per domain the projection is fitted on (a seeded sample beyond that)
PCA_DIM = 256  # the eigenproblem is solved on the top principal components of both domains (JDA's own set-up)


@dataclass
class Projection:
    """z = scale * (x - mean) @ components: the fitted linear map."""

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (d, k)
    scale: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (self.scale * (np.asarray(x, dtype=np.float64) - self.mean) @ self.components).astype(np.float32)

    def padded(self, x: np.ndarray, width: int) -> np.ndarray:
        """The projection in the first k columns of a `width`-wide matrix (what the classifier is trained on)."""
        z = self(x)
        out = np.zeros((len(z), width), dtype=np.float32)
        out[:, : z.shape[1]] = z
        return out

    def fold(self, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A classifier trained on :meth:`padded` features as (weight, bias) on the original features."""
        k = self.components.shape[1]
        folded = self.scale * weight[:, :k] @ self.components.T
        return folded.astype(np.float32), (bias - folded @ self.mean).astype(np.float32)


def _sample(x: np.ndarray, seed: int) -> np.ndarray:
    if len(x) <= MAX_PER_DOMAIN:
        return np.asarray(x, dtype=np.float64)
    rows = np.random.default_rng(seed).choice(len(x), MAX_PER_DOMAIN, replace=False)
    return np.asarray(x[np.sort(rows)], dtype=np.float64)


def _mmd_matrix(ns: int, nt: int, source_mask: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> np.ndarray:
    """The vector e with e e^T = L: +1/n_s on (selected) source rows, -1/n_t on (selected) target rows."""
    e = np.zeros(ns + nt)
    s = np.ones(ns, bool) if source_mask is None else source_mask
    t = np.ones(nt, bool) if target_mask is None else target_mask
    if s.sum() and t.sum():
        e[:ns][s] = 1.0 / s.sum()
        e[ns:][t] = -1.0 / t.sum()
    return e


def _principal(x: np.ndarray) -> np.ndarray:
    """(d, min(PCA_DIM, d)) orthonormal basis of the top principal directions of centred rows."""
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return vt[:PCA_DIM].T


def _solve(x: np.ndarray, mmd_vectors: list[np.ndarray], dim: int, mu: float) -> np.ndarray:
    """Top-`dim` solutions of  X^T H X a = lambda (X^T (sum e e^T) X + mu I) a  (x already centred),
    solved on the principal components and mapped back to the input features."""
    basis = _principal(x)
    x = x @ basis
    scatter = x.T @ x
    distance = sum(np.outer(x.T @ e, x.T @ e) for e in mmd_vectors)
    d = x.shape[1]
    values, vectors = eigh(scatter, distance + mu * np.eye(d) * np.trace(scatter) / d)
    return basis @ vectors[:, np.argsort(values)[::-1][:dim]]


def _projection(mean: np.ndarray, components: np.ndarray, x: np.ndarray) -> Projection:
    z = (x - mean) @ components
    return Projection(mean, components, float(1.0 / max(z.std(), 1e-12)))


def fit_tca(source: np.ndarray, target: np.ndarray, dim: int = 64, mu: float = 1.0, seed: int = 0) -> Projection:
    xs, xt = _sample(source, seed), _sample(target, seed + 1)
    x = np.vstack([xs, xt])
    mean = x.mean(0)
    components = _solve(x - mean, [_mmd_matrix(len(xs), len(xt))], min(dim, x.shape[1], PCA_DIM), mu)
    return _projection(mean, components, x)


def fit_jda(
    source: np.ndarray, labels: np.ndarray, target: np.ndarray, dim: int = 64, mu: float = 1.0, iterations: int = 5,
    seed: int = 0,
) -> Projection:
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(source), min(len(source), MAX_PER_DOMAIN), replace=False))
    xs, ys = np.asarray(source[keep], dtype=np.float64), np.asarray(labels)[keep]
    xt = _sample(target, seed + 1)
    x = np.vstack([xs, xt])
    mean = x.mean(0)
    centred = x - mean
    classes = np.unique(ys)
    pseudo: np.ndarray | None = None
    projection = None
    for _ in range(iterations + 1):
        vectors = [_mmd_matrix(len(xs), len(xt))]
        if pseudo is not None:
            vectors += [_mmd_matrix(len(xs), len(xt), ys == c, pseudo == c) for c in classes]
        projection = _projection(mean, _solve(centred, vectors, min(dim, x.shape[1], PCA_DIM), mu), x)
        model = LogisticRegression(max_iter=500).fit(projection(xs), ys)
        pseudo = model.predict(projection(xt))
    return projection


class Subspace(ExtraMethod):
    """TCA/JDA as methods: the projection is fitted on the pooled features of the pretrained tail (at any cut:
    the tail's blocks then stay pretrained and only the classifier learns), the classifier trains on the
    projected source features, and the projection is folded into it."""

    def project(self, source: np.ndarray, target: np.ndarray, y_train: np.ndarray, plan: Plan):
        raise NotImplementedError

    def fit(self, plan: Plan, tail: Tail, train_rows, y_train: np.ndarray, extra: Extra | None) -> Candidate:
        source, target = pooled_features(tail, train_rows), pooled_features(tail, extra.views[0])
        return Candidate(self.name, replace(plan, objective="supervised"), self.project(source, target, y_train, plan))

    def train(self, tail: Tail, cand: Candidate, train_views, y_train, valid_x, y_valid, extra, task, log, **run):
        width = tail.model.num_features
        train_views = [cand.projection.padded(pooled_features(tail, v), width) for v in train_views]
        valid_x = cand.projection.padded(pooled_features(tail, valid_x), width)
        history = train_cached(Tail(tail.model, POOLED, dropout=tail.dropout), train_views, y_train, valid_x, y_valid,
                               cand.plan, log, task=task, **run)
        classifier = tail.model.get_classifier()
        weight, bias = cand.projection.fold(classifier.weight.detach().numpy(), classifier.bias.detach().numpy())
        with torch.no_grad():
            classifier.weight.copy_(torch.from_numpy(weight))
            classifier.bias.copy_(torch.from_numpy(bias))
        return history


@register_method
class TCAMethod(Subspace):
    name, kinds, order = "tca", ("adapt",), 50

    def project(self, source, target, y_train, plan):
        return fit_tca(source, target, plan.tca_dim, seed=plan.seed)


@register_method
class JDAMethod(Subspace):
    name, kinds, order = "jda", ("adapt",), 60

    def project(self, source, target, y_train, plan):
        return fit_jda(source, y_train, target, plan.tca_dim, seed=plan.seed)
