"""Run a model over image files in batches: decode in workers, forward in inference mode, stream out.

Shared by feature caching, evaluation and prediction so all of them get the same speed settings
(channels-last memory layout, no autograd) and the same handling of files that fail to decode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from visiontune.data.catalog import Skipped
from visiontune.data.loader import ImageFiles, iterate_batches
from visiontune.data.transforms import Preprocessing, eval_transform
from visiontune.progress import progress_bar


def default_workers() -> int:
    """Decode in one background process: on 2 cores the other runs the model."""
    return 1


def stream_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[Path],
    preprocessing: Preprocessing,
    batch_size: int = 64,
    workers: int | None = None,
    description: str = "running",
    transform: Callable | None = None,
    skipped: list[Skipped] | None = None,
    seeds: Sequence[int] | None = None,
    views: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices into `paths`, outputs as float32 numpy) per batch; failed files go to `skipped`.

    `transform` defaults to the deterministic eval preset; `seeds` seed a random one per image.
    `forward` may be any engine's function (see :mod:`visiontune.engines`). With `views` > 1 the
    transform returns several views per image (TTA) and `forward` takes [batch, views, 3, H, W].
    """
    dataset = ImageFiles(paths, None, transform or eval_transform(preprocessing), preprocessing.input_size, seeds, views)
    if workers is None:
        # a background decoder pays only when there is more than one batch to overlap with the model;
        # for a single batch (a single image, a served request) starting the process costs ~100x the decode
        workers = default_workers() if len(paths) > batch_size else 0
    batches = iterate_batches(dataset, batch_size, workers=workers)
    show = len(paths) > batch_size  # a bar for one batch costs more than the batch (single-image latency)
    with (progress_bar() if show else nullcontext()) as bar, torch.inference_mode():
        task = bar.add_task(description, total=len(paths)) if show else None
        for batch in batches:
            if show:
                bar.advance(task, len(batch.indices) + len(batch.failed))
            if skipped is not None:
                skipped.extend(Skipped(path, reason) for _, path, reason in batch.failed)
            if len(batch.indices) == 0:
                continue
            images = batch.images
            if images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            yield batch.indices.numpy(), forward(images).float().numpy()


def collect_outputs(*args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """All of :func:`stream_outputs` at once: (indices, outputs) in input order, failed files left out."""
    return gather(stream_outputs(*args, **kwargs))


def gather(stream, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices, outputs) batches -> one pair in input order (empty outputs are [0, width])."""
    parts = list(stream)
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty((0, width), dtype=np.float32)
    indices = np.concatenate([p[0] for p in parts])
    outputs = np.concatenate([p[1] for p in parts])
    order = np.argsort(indices, kind="stable")
    return indices[order], outputs[order]
