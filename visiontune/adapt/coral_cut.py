"""CORAL in closed form on the cached activations at the cut (Sun, Feng & Saenko 2016, "Return of
frustratingly easy domain adaptation"): the source activations are whitened with their own covariance and
re-coloured with the target's, the tail is trained on them, and the saved classifier then reads target
images as they are — no extra layer, nothing to fold, export and TTA unchanged.

Why at the cut and not on the pooled features (what ``--adapt coral``, Deep CORAL's loss, aligns): a
change of camera, colour or texture shows first in the statistics of the mid-level feature maps, and the
tail's own blocks, trained on re-coloured source maps, learn to read target-like maps. On the bench's
MNIST-M-style shift this closed-form step alone moved target accuracy from 0.662 to 0.7055, and to 0.713
with self-training after it (bench/RESULTS.md).

Covariances are per spatial position of the maps (C x C each: where in the image a texture sits changes
its statistics), over at most ``MAX_PER_DOMAIN`` rows of each domain. Each covariance is shrunk towards a
multiple of the identity, C + ``shrink`` * (trace(C) / d) * I: the paper adds I to covariances of
standardised features, which is shrink = 1 on features of unit variance; it keeps the whitening stable
when a domain has fewer images than channels. The mean moves with the covariance (source mean -> target
mean). Pooled vectors (cut ``pooled``) are one position.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from visiontune.backbones.cuts import Tail
from visiontune.errors import UsageError
from visiontune.semi.self_train import self_train
from visiontune.train.extra_methods import Candidate, Extra, ExtraMethod, register_method
from visiontune.train.phases import take_rows, train_cached
from visiontune.train.plan import Plan

MAX_PER_DOMAIN = 4000  # rows per domain the covariances are estimated on (a seeded sample beyond that)
CHUNK = 512  # rows mapped at a time


def _power(cov: np.ndarray, exponent: float) -> np.ndarray:
    """cov ** exponent for a symmetric positive definite matrix, by its eigendecomposition."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.clip(values, 1e-12, None) ** exponent) @ vectors.T


def _positions(rows: np.ndarray) -> np.ndarray:
    """(n, C, H, W) or (n, C) as (positions, n, C)."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 2:
        return rows[None]
    n, c = rows.shape[:2]
    return rows.reshape(n, c, -1).transpose(2, 0, 1)


def _sample(rows, seed: int) -> np.ndarray:
    n = len(rows)
    picked = np.arange(n) if n <= MAX_PER_DOMAIN else np.sort(np.random.default_rng(seed).choice(n, MAX_PER_DOMAIN, replace=False))
    return take_rows(rows, picked)


@dataclass
class Recolouring:
    """x -> (x - source mean) @ maps + target mean, per position: source activations with the target's
    mean and covariance."""

    source_mean: np.ndarray  # (positions, C)
    target_mean: np.ndarray  # (positions, C)
    maps: np.ndarray  # (positions, C, C)
    shape: tuple[int, ...]  # one row's shape

    def __call__(self, rows) -> np.ndarray:
        """The re-coloured rows (float32, in memory: n x one row's size)."""
        out = np.empty((len(rows), *self.shape), dtype=np.float32)
        for start in range(0, len(rows), CHUNK):
            picked = np.arange(start, min(start + CHUNK, len(rows)))
            x = _positions(take_rows(rows, picked))
            y = np.einsum("pnc,pcd->pnd", x - self.source_mean[:, None], self.maps) + self.target_mean[:, None]
            out[picked] = (y[0] if len(self.shape) == 1 else y.transpose(1, 2, 0).reshape(len(picked), *self.shape))
        return out


def fit_recolouring(source, target, shrink: float = 1.0, seed: int = 0) -> Recolouring:
    """The map that gives source activations the target's per-position mean and (shrunk) covariance."""
    for name, rows in (("source", source), ("target", target)):
        if len(rows) < 2:  # a covariance needs two images; one would make every weight NaN
            raise UsageError(f"--adapt coral-cut estimates each domain's covariance and needs at least 2 {name} "
                             f"images (got {len(rows)}): add images or choose another --adapt method")
    s, t = _positions(_sample(source, seed)), _positions(_sample(target, seed + 1))
    source_mean, target_mean = s.mean(1), t.mean(1)
    maps = np.empty((s.shape[0], s.shape[2], s.shape[2]))
    for p in range(s.shape[0]):
        cov_s, cov_t = np.cov(s[p], rowvar=False), np.cov(t[p], rowvar=False)
        d = len(cov_s)
        cov_s += shrink * np.trace(cov_s) / d * np.eye(d)
        cov_t += shrink * np.trace(cov_t) / d * np.eye(d)
        maps[p] = _power(cov_s, -0.5) @ _power(cov_t, 0.5)
    return Recolouring(source_mean, target_mean, maps, tuple(source.shape[1:]))


@register_method
class CoralCut(ExtraMethod):
    """coral-cut as a method: the re-colouring is fitted before training, and the tail trains (and validates)
    on the re-coloured source activations; the saved classifier reads target images as they are."""

    name, kinds, order = "coral-cut", ("adapt",), 20

    def fit(self, plan: Plan, tail: Tail, train_rows, y_train: np.ndarray, extra: Extra | None) -> Candidate:
        return Candidate(self.name, replace(plan, objective="supervised"),
                         recolour=fit_recolouring(train_rows, extra.views[0], plan.coral_shrink, seed=plan.seed))

    def train(self, tail: Tail, cand: Candidate, train_views, y_train, valid_x, y_valid, extra, task, log, **run):
        train_views, valid_x = [cand.source_rows(v) for v in train_views], cand.source_rows(valid_x)
        return self.after_recolouring(tail, cand, train_views, y_train, valid_x, y_valid, extra, task, log, **run)

    def after_recolouring(self, tail, cand, train_views, y_train, valid_x, y_valid, extra, task, log, **run):
        return train_cached(tail, train_views, y_train, valid_x, y_valid, cand.plan, log, task=task, **run)


@register_method
class CoralCutSelfTrain(CoralCut):
    """coral-cut, then self-training on the target images, its re-coloured source model giving the pseudo-labels."""

    name, order = "coral-cut+self-train", 30

    def after_recolouring(self, tail, cand, train_views, y_train, valid_x, y_valid, extra, task, log, **run):
        return self_train(tail, cand.plan, train_views, y_train, valid_x, y_valid, extra, task, log, **run)
