"""Stratified, seeded validation splits, and the `visiontune split` folder layout.

Written per class rather than with scikit-learn's `train_test_split(stratify=...)` because that refuses
classes with a single image, which real folders have; here such a class simply stays in training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from visiontune.data.archives import split_member
from visiontune.data.walk import LINKS_FILE
from visiontune.data.catalog import Catalog, DataError


def kfold_indices(labels: list[int], folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, valid) indices of fold `fold` of a stratified, shuffled K-fold (scikit-learn): every image is
    in exactly one validation fold."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise DataError(f"--folds needs at least 2 folds (got {folds})")
    counts = np.bincount(np.asarray(labels))
    if counts[counts > 0].min() < folds:
        raise DataError(f"--folds {folds}: the smallest class has only {counts[counts > 0].min()} images; use fewer folds")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_idx, valid_idx = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    return sorted(train_idx.tolist()), sorted(valid_idx.tolist())


def stratified_split(labels: list[int], valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, valid): each class contributes round(n * fraction) images to valid.

    A class with at least two images always keeps one in each part; a single-image class stays in train.
    The same labels, fraction and seed always give the same split.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid fraction must be between 0 and 1 (got {valid_fraction}). Try --valid 0.2.")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train_idx: list[int] = []
    valid_idx: list[int] = []
    for cls in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == cls)
        rng.shuffle(members)
        n_valid = int(round(len(members) * valid_fraction))
        if len(members) >= 2:
            n_valid = min(max(n_valid, 1), len(members) - 1)
        else:
            n_valid = 0
        valid_idx.extend(members[:n_valid].tolist())
        train_idx.extend(members[n_valid:].tolist())
    return sorted(train_idx), sorted(valid_idx)


def hold_out(labels_or_count, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) positions, sorted int64 arrays: the one carver of images held out of a fit for a choice
    (selection images, auto's inner split, auto's scored target images). Labels: stratified
    (:func:`stratified_split`). A count (unlabelled images): a seeded `fraction` of them, at least one; a
    single image is both kept and held (nothing can be held out)."""
    if isinstance(labels_or_count, (int, np.integer)):
        n = int(labels_or_count)
        order = np.random.default_rng(seed).permutation(n)
        held = max(1, int(n * fraction)) if n > 1 else 0
        return np.sort(order[held:]), np.sort(order[:held] if held else order)
    kept, held = stratified_split([int(y) for y in labels_or_count], fraction, seed)
    return np.asarray(kept, dtype=np.int64), np.asarray(held, dtype=np.int64)


def split_catalog(catalog: Catalog, valid_fraction: float, seed: int) -> tuple[Catalog, Catalog]:
    """Stratified (train, valid) catalogs from one catalog."""
    train_idx, valid_idx = stratified_split(catalog.labels, valid_fraction, seed)
    return catalog.subset(train_idx), catalog.subset(valid_idx)


def _link(src: Path, dst: Path) -> str:
    """Hard-link `src` to `dst`, or symlink when a hard link is impossible (another file system)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        dst.symlink_to(src.resolve())
        return "symlink"


def write_split_folders(catalog: Catalog, source_root: Path, dest: Path, valid_fraction: float, seed: int) -> dict:
    """Lay out `dest/train/<class>/...` and `dest/valid/<class>/...` as links to the source files.

    Never copies image bytes and never touches an existing non-empty `dest`.
    """
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"{dest}: already exists and is not empty. Choose a new destination folder.")
    if split_member(source_root / "x") is not None:
        raise DataError(f"{source_root}: split links files, and a .zip/.tar holds none to link. Train on the archive "
                        "directly (visiontune train ARCHIVE: a stratified split is made in memory) or extract it first.")
    train, valid = split_catalog(catalog, valid_fraction, seed)
    kinds: dict[str, int] = {}
    for part, cat in (("train", train), ("valid", valid)):
        for path, label in zip(cat.paths, cat.labels):
            rel = path.relative_to(source_root / catalog.classes[label])
            kind = _link(path, dest / part / catalog.classes[label] / rel)
            kinds[kind] = kinds.get(kind, 0) + 1
    if kinds.get("symlink"):  # symlinks lead out of `dest`: allow their source folder (data/walk.py)
        (dest / LINKS_FILE).write_text(os.path.realpath(source_root) + "\n")  # read for train/ and valid/
    return {"train": len(train), "valid": len(valid), "links": kinds}
