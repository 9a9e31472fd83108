"""The step seam: a training method is an :class:`Objective` that turns (module, batch) into a loss.

A batch is a small dict of tensors: ``x`` (inputs: images or cached activations) and ``y`` (targets:
class indices or multi-hot rows); methods that learn from more add their own keys (unlabelled views,
target-domain inputs, sample weights). Every training loop in visiontune — the epoch loop, the LR
finder, the batch-size search, ``doctor``'s overfit check and the speed profile — runs the same
:func:`train_step`, so a method behaves the same everywhere it is used.

A new method is one file: subclass :class:`Objective`, decorate it with ``@register_objective("name")``
and train with ``--objective name`` / ``fit(..., objective="name")``. The shape follows USB's
(`semilearn`) algorithm classes and Lightning's ``training_step``: the method owns its loss, the loop
owns optimisation, schedules, checkpoints and logging. Extras a method needs once per step or epoch
(an EMA teacher, a ramp-up) come as :class:`~visiontune.train.callbacks.Callback` objects from
:meth:`Objective.callbacks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from visiontune.device import CPU, Precision
from visiontune.errors import UsageError
from visiontune.task.kinds import SingleLabel, Task
from visiontune.task.losses import mix_batch

Batch = dict[str, torch.Tensor]


@dataclass
class ObjectiveSetup:
    """What a method may read when it is built: the plan's settings, the task, the training labels."""

    settings: Any  # the Plan (or an object with the same attributes)
    task: Task
    labels: np.ndarray  # training labels (class indices): class weights, class counts
    n_classes: int
    module: nn.Module | None = None  # what trains (a Tail, or the whole model): methods may copy it (teachers)
    total_steps: int = 0  # optimizer steps in the phase: ramp-ups and schedules of a method
    input_shape: tuple[int, ...] | None = None  # one input's shape (cached activations: (C, H, W) or (D,))


class Objective:
    """One training method: :meth:`loss` of a batch, plus the logs it wants recorded (floats)."""

    name: ClassVar[str] = ""
    step: int = 0  # the phase's optimizer step, set by the loop before each call of `loss` (exact on resume)

    def __init__(self, setup: ObjectiveSetup):
        self.setup = setup

    def loss(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def callbacks(self) -> list:
        """Per-step/epoch extras this method needs (see train/callbacks.py); none by default."""
        return []

    def modules(self) -> dict[str, nn.Module]:
        """The method's own trainable modules (a domain discriminator, a peer head): the loop optimizes
        them beside the phase's parameters; saved with checkpoints."""
        return {}

    def state_modules(self) -> dict[str, nn.Module]:
        """Everything of the method's to save with a checkpoint: its trainable modules and any others
        (an EMA teacher)."""
        return self.modules()


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str):
    """Class decorator: make an Objective trainable as `--objective name`."""

    def register(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is registered already ({OBJECTIVES[name].__qualname__})")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return register


def make_objective(name: str, setup: ObjectiveSetup) -> Objective:
    """The registered objective `name`, built for this phase."""
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective {name!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](setup)


@register_objective("supervised")
class Supervised(Objective):
    """The labelled-data objective: the task's loss (cross-entropy, focal, class-weighted, label-smoothed,
    or BCE for multi-label) on the batch, mixed first by mixup/cutmix when the plan asks for them."""

    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        self.criterion = setup.task.criterion(setup.settings, setup.labels, setup.n_classes)
        self.mixup = getattr(setup.settings, "mixup", 0.0)
        self.cutmix = getattr(setup.settings, "cutmix", 0.0)

    def loss(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch["x"], batch["y"]
        if self.mixup or self.cutmix:
            x, y = mix_batch(x, y, self.setup.n_classes, self.mixup, self.cutmix)
        return self.criterion(module(x), y), {}


#: Loss settings of plain cross-entropy: no smoothing, weights, focusing or mixing.
PLAIN = SimpleNamespace(loss="ce", label_smoothing=0.0, focal_gamma=2.0, class_weights="none", sampler="random",
                        fbeta=2.0, mixup=0.0, cutmix=0.0)


def plain_objective(n_classes: int = 0) -> Objective:
    """Plain single-label cross-entropy, for steps taken before a plan exists (the speed profile,
    doctor's overfit check)."""
    return Supervised(ObjectiveSetup(PLAIN, SingleLabel(), np.zeros(0, dtype=np.int64), n_classes))


def batch_size_of(batch: Batch) -> int:
    """Labelled items in a batch (what the running training loss is averaged over)."""
    return len(batch["y"]) if "y" in batch else len(batch["x"])


def train_step(
    module: nn.Module, objective: Objective, batch: Batch, optimizer: torch.optim.Optimizer,
    precision: Precision | bool = False, scale: float = 1.0, parts: int = 1, scaler=None,
) -> tuple[float, dict[str, float]]:
    """One optimizer step of `objective` on `batch`, under `precision`'s autocast (a bool: bf16 autocast on the
    CPU when True); returns (loss, logs).

    `scale` weights the gradient: a rank of a distributed run holds part of the global batch, and
    DistributedDataParallel averages over ranks, so each rank's loss counts by its share of the batch.
    `parts` > 1 accumulates the gradients of that many slices of the batch before the one optimizer step
    (what an out-of-memory error leaves: the same effective batch in smaller forwards). `scaler`: fp16's
    gradient scaler (:meth:`visiontune.device.Precision.scaler`)."""
    if isinstance(precision, bool):
        precision = Precision(CPU, precision)
    optimizer.zero_grad(set_to_none=True)
    n = batch_size_of(batch)
    total, logs = 0.0, {}
    for piece in split_batch(batch, parts):
        share = batch_size_of(piece) / n if parts > 1 else 1.0
        with precision.autocast():
            loss, piece_logs = objective.loss(module, piece)
        weighted = loss * (scale * share) if scale * share != 1.0 else loss
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
        total += float(loss.detach()) * share
        for key, value in piece_logs.items():
            logs[key] = logs.get(key, 0.0) + value * share
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total, logs


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`batch` cut into `parts` slices along the first dimension (each key sliced in proportion to its own
    length: unlabelled keys hold `ratio` items per labelled one); one slice when `parts` is 1."""
    n = batch_size_of(batch)
    parts = max(1, min(parts, n))
    if parts == 1:
        return [batch]
    pieces = []
    for k in range(parts):
        piece = {}
        for key, value in batch.items():
            m = len(value)
            piece[key] = value[k * m // parts : (k + 1) * m // parts]
        pieces.append(piece)
    return [piece for piece in pieces if batch_size_of(piece)]
