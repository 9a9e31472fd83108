"""Dataset statistics the notes ask for before training: per-channel mean/std, duplicate files."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visiontune.data.images import ImageError, content_hash, load_rgb


def mean_std(paths: Sequence[Path], size: int = 64) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and std of pixel values in [0, 1] (images resized to `size`), streamed: memory is
    flat in the number of images. Returns (mean, std, images used); unreadable files are left out."""
    total = np.zeros(3)
    squares = np.zeros(3)
    pixels = 0
    used = 0
    for path in paths:
        try:
            image = load_rgb(path).resize((size, size))
        except ImageError:
            continue
        array = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        total += array.sum(0)
        squares += (array**2).sum(0)
        pixels += len(array)
        used += 1
    if pixels == 0:
        return (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std), used


def duplicate_groups(paths: Sequence[Path], labels: Sequence[int]) -> list[list[tuple[str, int]]]:
    """Groups of byte-identical files (by content hash) with their labels; the conflicting ones (same
    image, different labels) are label errors, the others leak between train and validation."""
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for path, label in zip(paths, labels):
        try:
            groups[content_hash(path)].append((str(path), int(label)))
        except OSError:
            continue
    return [g for g in groups.values() if len(g) > 1]
