"""Batches of decoded images that survive bad files.

A file that passed the header check can still be truncated. Instead of raising inside a DataLoader
worker (which kills the whole run), a bad file yields a blank tensor flagged as failed, with its reason;
the consumer drops it from the batch and counts it. Seeds make shuffling and augmentation repeatable.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visiontune.data.images import ImageError, load_rgb


@dataclass
class Batch:
    """Decoded images with their labels and positions in the source list; `failed` ones are removed."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    failed: list[tuple[int, str, str]]  # (index, path, reason)


class ImageFiles(Dataset):
    """Image files with optional labels, decoded through :func:`load_rgb` and `transform`.

    With `seeds`, the random transform of item i is seeded by seeds[i]: an augmented view is then the
    same whichever worker or run produces it, which is what makes cached augmented views reproducible.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        transform: Callable,
        size: int,
        seeds: Sequence[int] | None = None,
        views: int = 1,
    ):
        self.views = views  # > 1: the transform returns [views, 3, H, W] (test-time augmentation)
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.size = size
        self.seeds = list(seeds) if seeds is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str | None]:
        try:
            if self.seeds is not None:
                torch.manual_seed(self.seeds[index])
            image = self.transform(load_rgb(self.paths[index]))
            return image, self.labels[index], index, None
        except ImageError as err:
            shape = (3, self.size, self.size) if self.views == 1 else (self.views, 3, self.size, self.size)
            return torch.zeros(shape), self.labels[index], index, err.reason


def _collate(items: list) -> tuple:
    images, labels, indices, errors = zip(*items)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices), list(errors)


def _seed_worker(worker_id: int) -> None:
    """Give each worker a seed derived from torch's, so numpy/random augmentation repeats too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def iterate_batches(
    dataset: ImageFiles,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    workers: int = 1,
    order: Sequence[int] | None = None,
) -> BatchIterator:
    """Batches in order (or shuffled with `seed`, or in the explicit `order` of item indices, which is how
    a resumed epoch starts mid-way), decoded in `workers` background processes."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and order is None,
        sampler=list(order) if order is not None else None,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=False,
    )
    return BatchIterator(loader, dataset)


class BatchIterator:
    """Wraps a DataLoader to drop failed images from each batch (a batch may end up empty)."""

    def __init__(self, loader: DataLoader, dataset: ImageFiles):
        self.loader = loader
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, indices, errors in self.loader:
            failed = [(int(i), str(self.dataset.paths[int(i)]), e) for i, e in zip(indices, errors) if e]
            if failed:
                keep = torch.tensor([e is None for e in errors])
                images, labels, indices = images[keep], labels[keep], indices[keep]
            yield Batch(images, labels, indices, failed)
