"""Pooled backbone features for a list of images, through the feature store.

This is fast.ai's `precompute=True` done safely: the frozen backbone runs once per image (per key), the
head phase then trains on the stored rows in seconds, and a later run with the same backbone, weights
and preprocessing skips the backbone entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visiontune.backbones.registry import Backbone
from visiontune.cache.store import FeatureStore, content_hash
from visiontune.data.catalog import Skipped
from visiontune.inference import collect_outputs
from visiontune.progress import track

#: Images per shard: small enough that a killed run loses little, large enough to keep file counts low.
SHARD_SIZE = 2048


def feature_key(backbone: Backbone, cut: str = "pooled", view: str = "eval") -> dict:
    """Everything that changes what a stored feature row means."""
    return {
        "arch": backbone.arch,
        "weights": backbone.weights_id,
        "preprocessing": backbone.preprocessing.to_dict(),
        "cut": cut,
        "view": view,
        "dtype": "float16",
    }


def pooled_features(
    backbone: Backbone,
    paths: Sequence[Path],
    cache_root: Path,
    batch_size: int = 64,
    workers: int | None = None,
    description: str = "features",
) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """(kept positions into `paths`, features float32 [n_kept, D], skipped files).

    Computes only the images no finished shard holds, one shard at a time, so an interrupted run
    resumes where it stopped.
    """
    store = FeatureStore(cache_root, feature_key(backbone))
    skipped: list[Skipped] = []
    hashes: list[str | None] = []
    for path in track(paths, f"hashing {description}"):
        try:
            hashes.append(content_hash(path))
        except OSError as exc:
            hashes.append(None)
            skipped.append(Skipped(str(path), f"cannot read: {exc}"))
    readable = [i for i, h in enumerate(hashes) if h is not None]
    todo_hashes: dict[str, int] = {}
    for i in readable:
        if hashes[i] not in store.index():
            todo_hashes.setdefault(hashes[i], i)
    todo = list(todo_hashes.values())
    backbone.model.eval()
    for start in range(0, len(todo), SHARD_SIZE):
        chunk = todo[start : start + SHARD_SIZE]
        chunk_skipped: list[Skipped] = []
        done, rows = collect_outputs(
            backbone.pooled_features,
            [paths[i] for i in chunk],
            backbone.preprocessing,
            batch_size=batch_size,
            workers=workers,
            description=f"{description} {start + len(chunk)}/{len(todo)} new",
            skipped=chunk_skipped,
        )
        skipped.extend(chunk_skipped)
        if len(done):
            store.add_shard([hashes[chunk[j]] for j in done], rows)
    index = store.index()
    kept = np.array([i for i in readable if hashes[i] in index], dtype=np.int64)
    return kept, store.get([hashes[i] for i in kept]), skipped
