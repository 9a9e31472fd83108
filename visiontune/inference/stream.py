"""Run a model over image files in batches: decode in the background, forward in inference mode, stream out.

Shared by feature caching, evaluation and prediction so all of them get the same speed settings
(no autograd, background decoding) and the same handling of files that fail to decode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from visiontune.data.catalog import Skipped
from visiontune.device import DeviceForward
from visiontune.data.images import load_rgb, load_rgb_or_gray
from visiontune.data.loader import ImageFiles, iterate_batches, prefetch
from visiontune.data.transforms import NormalisePixels, Preprocessing, eval_transform_uint8
from visiontune.progress import progress_bar


def stream_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[Path],
    preprocessing: Preprocessing,
    batch_size: int = 64,
    workers: int = 0,
    description: str = "running",
    transform: Callable | None = None,
    skipped: list[Skipped] | None = None,
    seeds: Sequence[int] | None = None,
    views: int = 1,
    busy_cores: bool | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices into `paths`, outputs as float32 numpy) per batch; failed files go to `skipped`.

    `transform` defaults to the deterministic eval preset; `seeds` seed a random one per image.
    `workers`: 0 decodes in a background thread of this process (inline for a single batch or seeded
    transforms), N in N processes.
    `forward` may be any engine's function (see :mod:`visiontune.inference.engines`). With `views` > 1 the
    transform returns several views per image (TTA) and `forward` takes [batch, views, 3, H, W].
    `busy_cores`: whether `forward` keeps every core busy (None: read from it, for a `forward` that wraps an
    engine pass the engine's `keeps_cores_busy`); sets the decoding thread's priority, see below.
    `activation` (a task's sigmoid/softmax) is applied to the outputs; passed apart rather than wrapped into
    `forward` so that a GPU forward is still seen as one (it takes uint8 pixels and pinned batches).
    """
    # the evaluation preset resizes gray images before their RGB conversion (a third of the work)
    dataset = ImageFiles(paths, None, transform or eval_transform_uint8(preprocessing), preprocessing.input_size, seeds,
                         views, load=load_rgb if transform is not None else load_rgb_or_gray)
    on_device = isinstance(forward, DeviceForward)
    batches = iterate_batches(dataset, batch_size, workers=workers, pin_memory=on_device and workers > 0)
    if transform is None:  # uint8 batches, normalised as a whole (and in the background thread below)
        normalise = NormalisePixels(preprocessing)
        if on_device:  # a quarter of the bytes to copy; the GPU normalises
            forward = forward.taking_pixels(normalise.scale, normalise.shift)
        else:
            batches = (replace(batch, images=normalise(batch.images)) for batch in batches)
    if workers == 0 and len(paths) > batch_size and seeds is None:
        # decode in a background thread (see loader.prefetch); a single batch (one image, a served request)
        # decodes inline, since even a thread's start-up costs more than overlapping it saves. Seeded random
        # transforms stay inline: they reseed torch's global generator, which a thread shares with the caller.
        # Low priority fills the gaps a multi-threaded forward leaves between operators; an engine that keeps
        # every core busy (onnxruntime's parallel sessions) leaves none, so there the thread shares the cores at
        # normal priority instead of decoding each next batch while the model waits (224 px, 2 cores, six
        # paired rounds: 185 vs 180 img/s, ahead in five).
        busy = getattr(forward, "keeps_cores_busy", False) if busy_cores is None else busy_cores
        batches = prefetch(batches, nice=0 if busy else 19)
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
            # images stay NCHW: a PyTorch model whose weights are channels-last (every visiontune model) runs
            # channels-last from its first convolution on, and onnxruntime wants NCHW
            outputs = forward(batch.images)
            yield batch.indices.numpy(), (outputs if activation is None else activation(outputs)).float().numpy()


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
