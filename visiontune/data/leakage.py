"""Leakage and label conflicts a training run must report before its numbers are believed.

* **The same image in two classes** (byte-identical files with different labels): label noise the model
  cannot fit and the metrics cannot score fairly; the user must fix or remove one of them.
* **The same image in train and validation** (byte-identical, same label): validation then measures
  memory, not generalisation.
* **Near-duplicates across the split** (the same picture re-encoded or resized): validation images whose
  32-pixel grayscale thumbnail correlates at >= `NEAR_CORRELATION` with a training image's. Measured on
  Fashion-MNIST, colour photo patches and the synthetic test images: JPEG re-encodes (quality 90)
  correlate at >= 0.9968 and 5 % rescales at >= 0.992 with their originals, while no distinct image's
  nearest training image exceeds 0.9832 (200 validation images each). Crops and shifts are not caught:
  on 28-pixel images a one-pixel crop falls to 0.90, among distinct images. Byte-identical pairs are the
  exact check's, not counted twice.

Content hashes come from the header check every file already went through (memoised), so the exact
checks cost no extra read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.data.images import ImageError, content_hash, gray_thumbnail

#: Thumbnail side and the correlation from which two thumbnails are the same picture (see the docstring).
THUMB_SIDE = 32
NEAR_CORRELATION = 0.99
#: Pairs compared at most (validation x training); beyond, a seeded sample of validation images is checked.
MAX_PAIRS = 200_000_000


@dataclass
class Leakage:
    """What the checks found: paths (as strings) with their class names."""

    conflicting: list[list[tuple[str, str]]] = field(default_factory=list)  # groups: same bytes, several labels
    across_split: list[tuple[str, str]] = field(default_factory=list)  # (train, valid): same bytes
    near_across_split: list[tuple[str, str, float]] = field(default_factory=list)  # (train, valid, correlation)
    near_checked: int = 0  # validation images the near-duplicate check looked at

    def lines(self, shown: int = 3) -> list[str]:
        """One warning line per kind found, with a few examples and what to do."""
        out = []
        if self.conflicting:
            examples = "; ".join(" = ".join(f"{p} ({c})" for p, c in group) for group in self.conflicting[:shown])
            out.append(f"same image in different classes: {len(self.conflicting)} groups ({examples}) — label noise; "
                       "keep the right class and delete the other copies")
        if self.across_split:
            examples = "; ".join(f"{v} = {t}" for t, v in self.across_split[:shown])
            out.append(f"{len(self.across_split)} validation images are byte-identical to training images ({examples}) "
                       "— validation overstates accuracy; remove them from one side")
        if self.near_across_split:
            examples = "; ".join(f"{v} ~ {t}" for t, v, _ in self.near_across_split[:shown])
            out.append(f"{len(self.near_across_split)} validation images are near-duplicates of training images "
                       f"({examples}) — validation overstates accuracy; keep copies on one side of the split")
        return out

    def to_dict(self) -> dict:
        return {"conflicting": self.conflicting, "identical_across_split": self.across_split,
                "near_across_split": self.near_across_split, "near_checked": self.near_checked,
                "near_correlation": NEAR_CORRELATION}


def exact_leakage(train: list[Path], train_labels: list[int], valid: list[Path], valid_labels: list[int],
                  classes: list[str]) -> Leakage:
    """Byte-identical files: across classes (anywhere) and across the split (same class). The hashes are
    sorted as one fixed-width array (32 bytes per image), so a 100k-image folder costs ~3 MB here."""
    paths = [*train, *valid]
    labels = np.asarray([*train_labels, *valid_labels], dtype=np.int64)
    digests = np.array([_hash_or_blank(p, i) for i, p in enumerate(paths)], dtype="S32")
    order = np.argsort(digests, kind="stable")
    ordered = digests[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    found = Leakage()
    for start, end in zip(starts, ends):
        if end - start < 2:
            continue
        members = [(str(paths[j]), int(labels[j]), "train" if j < len(train) else "valid") for j in order[start:end]]
        if len({label for _, label, _ in members}) > 1:
            found.conflicting.append([(p, classes[label] if label >= 0 else "?") for p, label, _ in members])
            continue
        trains = [p for p, _, part in members if part == "train"]
        found.across_split += [(trains[0], p) for p, _, part in members if part == "valid" and trains]
    return found


def thumbnail(path: Path) -> np.ndarray:
    """The picture as a unit vector: 32x32 grayscale, mean removed (brightness- and contrast-free), so a dot
    product of two is their correlation. JPEGs decode at reduced size (`draft`): cheap even for photos.
    A flat or unreadable image gives zeros (it correlates with nothing)."""
    try:
        pixels = gray_thumbnail(path, THUMB_SIDE).astype(np.float32)
    except ImageError:
        return np.zeros(THUMB_SIDE * THUMB_SIDE, np.float32)
    pixels = pixels.ravel() - pixels.mean()
    norm = float(np.linalg.norm(pixels))
    return pixels / norm if norm > 1e-3 else np.zeros_like(pixels)


def _hash_or_blank(path: Path, position: int) -> bytes:
    """The content hash, or a placeholder unique to `position` for a file that cannot be read any more."""
    try:
        return content_hash(path).encode()
    except OSError:
        return f"unreadable-{position}".encode()


def near_leakage(found: Leakage, train_thumbs, train: list[Path], valid_thumbs, valid: list[Path], seed: int = 0,
                 chunk: int = 1024) -> Leakage:
    """Add validation images whose thumbnail correlates at >= `NEAR_CORRELATION` with a training image's
    (the most correlated one is named); pairs the exact check found are left out. The thumbnails may be
    arrays or lazily read store rows: both sides are read `chunk` rows at a time, so memory stays flat."""
    if not len(train) or not len(valid):
        return found
    picked = np.arange(len(valid))
    if len(valid) * len(train) > MAX_PAIRS:
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(len(valid), size=max(1, MAX_PAIRS // len(train)), replace=False))
    exact = {p for t, v in found.across_split for p in (t, v)} | {p for group in found.conflicting for p, _ in group}
    for start in range(0, len(picked), chunk):
        rows = picked[start : start + chunk]
        queries = np.asarray(valid_thumbs[rows], dtype=np.float32)
        best = np.full(len(rows), -np.inf, np.float32)
        best_index = np.zeros(len(rows), np.int64)
        for base in range(0, len(train), chunk):
            block = np.asarray(train_thumbs[np.arange(base, min(base + chunk, len(train)))], dtype=np.float32)
            correlation = queries @ block.T
            j = correlation.argmax(1)
            value = correlation[np.arange(len(rows)), j]
            better = value > best
            best[better], best_index[better] = value[better], base + j[better]
        for row, value, j in zip(rows, best, best_index):
            pair = (str(train[j]), str(valid[row]))
            if value >= NEAR_CORRELATION and not (pair[0] in exact and pair[1] in exact):
                found.near_across_split.append((*pair, round(float(value), 4)))
    found.near_checked = len(picked)
    return found
