"""How the data looks to the backbone, and how fast this machine runs it: the plan's measured inputs.

* :class:`DataProfile`: dataset size, image size, how grayscale it is and how far from ImageNet (the mean
  normalised entropy of the backbone's own ImageNet head on a sample: near 0 = confident ImageNet-like
  content, near 1 = nothing it knows).
* :class:`SpeedProfile`: seconds per image to decode, to run the frozen trunk to each cut, and to train
  each tail — timed on a few real batches, so `--budget` predicts the cost of each phase on this machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import numpy as np
import torch

from visiontune.backbones.cuts import POOLED, Tail, Trunk
from visiontune.backbones.registry import Backbone
from visiontune.data.catalog import Catalog
from visiontune.device import CPU, Device, Precision, loader_workers, move, synchronize
from visiontune.data.images import ImageError, load_rgb
from visiontune.data.transforms import eval_transform
from visiontune.inference.engines import RELATIVE_TRUNK_TIME, compile_forward
from visiontune.train.objectives import plain_objective, train_step

SAMPLE = 32


@dataclass
class DataProfile:
    n_train: int
    n_valid: int
    n_classes: int
    median_side: int | None
    grayscale: float  # fraction of sampled images with R == G == B
    imagenet_entropy: float | None  # mean normalised entropy of the source head's predictions, 0..1
    class_counts: list[int] | None = None  # training images per class (class order of the catalog)

    @property
    def smallest_to_largest(self) -> float:
        """Images of the smallest class / of the largest (1.0 = balanced); classes without images excluded."""
        counts = [c for c in (self.class_counts or []) if c > 0]
        return min(counts) / max(counts) if counts else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def far_from_imagenet(self) -> bool:
        """Grayscale or unfamiliar content: the last block's ImageNet features need retraining."""
        return self.grayscale >= 0.5 or (self.imagenet_entropy is not None and self.imagenet_entropy >= 0.5)


def _sample_images(catalog: Catalog, count: int = SAMPLE) -> list:
    images = []
    for path in catalog.paths[:: max(1, len(catalog) // count)][:count]:
        try:
            images.append(load_rgb(path))
        except ImageError:
            continue
    return images


def profile_data(backbone: Backbone, train: Catalog, n_valid: int) -> DataProfile:
    """Measure a small sample of training images (decoding ~32 files and one forward pass)."""
    images = _sample_images(train)
    sides = [min(img.size) for img in images]
    gray = [bool(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])) for a in map(np.asarray, images)]
    entropy = None
    if backbone.source_head is not None and images:
        batch = torch.stack([eval_transform(backbone.preprocessing)(img) for img in images])
        trunk = Trunk(backbone.model, POOLED).eval()
        with torch.inference_mode():  # 8 at a time: 32 images at 224 px held ~450 MB of activations at once
            features = torch.cat([trunk(part.contiguous(memory_format=torch.channels_last)) for part in batch.split(8)])
            probs = backbone.source_head(features).softmax(-1)
        per_image = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])
        entropy = round(float(per_image.mean()), 3)
    return DataProfile(
        n_train=len(train),
        n_valid=n_valid,
        n_classes=len(train.classes),
        median_side=int(median(sides)) if sides else None,
        grayscale=round(sum(gray) / len(gray), 3) if gray else 0.0,
        imagenet_entropy=entropy,
        class_counts=np.bincount(np.asarray(train.labels, dtype=np.int64), minlength=len(train.classes)).tolist()
        if train.labels else None,
    )


@dataclass
class SpeedProfile:
    """Seconds per image for each part of a run, measured on this machine."""

    decode: float
    trunk: dict[str, float]  # cut -> forward seconds per image
    tail_train: dict[str, float]  # cut -> train-step seconds per image (forward + backward)
    tail_eval: dict[str, float]  # cut -> forward seconds per image
    full_forward_torch: float = 0.0  # the whole trunk's forward in torch (fine-tuning's unit), when timed

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn, repeats: int = 2, device: Device = CPU) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)  # a GPU runs behind the Python that queued its work
    return (time.perf_counter() - started) / repeats


def profile_speed(
    backbone: Backbone, train: Catalog, cuts: list[str], engine: str = "torch", batch: int = 32,
    engine_paths: dict[str, Path] | None = None, device: Device = CPU,
) -> SpeedProfile:
    """Time decoding, the trunk to each cut, and each tail's training step, on real sample images.

    The trunk is timed on `engine` itself for the cuts in `engine_paths` (where its exported file goes;
    onnxruntime's advantage over torch depends on the input size and the cut: 0.36-0.6x measured here),
    else timed in torch and scaled by the engine's typical relative speed. On a GPU (`device`) everything is
    timed there (the trunk in the engine's precision, the tails' steps under the plan's autocast), and
    decoding per image is shared by the decoding processes, one per core.
    """
    paths = train.paths[:: max(1, len(train) // batch)][:batch]
    transform = eval_transform(backbone.preprocessing)
    started = time.perf_counter()
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(load_rgb(path)))
        except ImageError:
            continue
    decode = (time.perf_counter() - started) / max(1, len(paths)) / loader_workers(device, 1)
    x = torch.stack(tensors).contiguous(memory_format=torch.channels_last)
    trunk, tail_train, tail_eval = {}, {}, {}
    full = 0.0
    model = backbone.model
    was_training = model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    precision = Precision(device, engine == "torch-bf16")
    if device.accelerated:
        model.to(device.torch_device)
        x = move(x, device)
    for cut in cuts:
        stem = Trunk(model, cut).eval()
        with torch.no_grad():  # not inference_mode: the activations feed a backward pass below
            if device.accelerated and engine != "onnxruntime":
                def on_device() -> torch.Tensor:
                    with precision.autocast():
                        return stem(x)

                trunk[cut] = torch_trunk = _timed(on_device, device=device) / len(x)
            elif engine != "torch" and cut in (engine_paths or {}):
                forward = compile_forward(stem, engine, backbone.preprocessing.input_size, engine_paths[cut])
                trunk[cut] = _timed(lambda: forward(x)) / len(x)
                torch_trunk = 0.0
            else:
                torch_trunk = _timed(lambda: stem(x)) / len(x)
                trunk[cut] = torch_trunk * RELATIVE_TRUNK_TIME[engine]
            if cut == POOLED:
                full = torch_trunk or _timed(lambda: stem(x), repeats=1, device=device) / len(x)
            activations = stem(x)
        tail = Tail(model, cut)
        optimizer = torch.optim.SGD(tail.trainable_parameters(), lr=0.0)
        batch = {"x": activations, "y": torch.zeros(len(x), dtype=torch.long, device=activations.device)}
        objective = plain_objective()

        def step() -> None:
            tail.train()
            train_step(tail, objective, batch, optimizer, Precision(device, device.accelerated))

        tail_train[cut] = _timed(step, device=device) / len(x)
        tail.eval()
        with torch.inference_mode():
            tail_eval[cut] = _timed(lambda: tail(activations), device=device) / len(x)
    model.to("cpu")
    model.load_state_dict(state)  # timing steps must not change the model (BN statistics)
    model.train(was_training)
    return SpeedProfile(decode, trunk, tail_train, tail_eval, full)
