"""What the semi-supervised methods share: the ramp-up of the unlabelled loss, augmentation of cached
activations, and the labelled part of every loss.

Methods see unlabelled images as cached activations, under the batch key ``u`` (semi-supervised) or
``xt`` (target-domain images, when a method such as self-training adapts to a domain): the plain view,
and ``<key>_aug``, one of the augmented cached views (the plain one again when none is cached). On top
of those the methods add :func:`feature_augment`, so two calls see two different versions of an image
without another trunk pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.train.objectives import Batch, Objective, ObjectiveSetup, Supervised


def unlabelled_key(batch: Batch) -> str:
    """``u`` (an unlabelled folder) or ``xt`` (a target-domain folder), whichever the batch carries."""
    return "u" if "u" in batch else "xt"


def sigmoid_rampup(step: int, total_steps: int, fraction: float) -> float:
    """exp(-5 (1 - t)^2) for t = step / (fraction * total), 1 after: Laine & Aila's ramp-up (also mean
    teacher's), so the unlabelled loss does not pull on the model before it predicts anything useful."""
    length = fraction * total_steps
    if length <= 0:
        return 1.0
    t = min(1.0, step / length)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def feature_augment(x: torch.Tensor, strength: float) -> torch.Tensor:
    """A random version of cached activations: feature maps are flipped left-right per item and lose whole
    channels (spatial dropout, p = 0.2 x strength); pooled vectors lose features (dropout, p = 0.2 x
    strength); both get gaussian noise of 0.1 x strength of their spread. Cheap stand-ins for image
    augmentation that need no second trunk pass. Draws from torch's global generator (checkpointed)."""
    if strength <= 0:
        return x
    if x.dim() == 4:
        flip = (torch.rand(len(x)) < 0.5).to(x.device)  # drawn on the CPU generator (checkpointed) on any device
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = F.dropout2d(x, p=min(0.5, 0.2 * strength), training=True)
    else:
        x = F.dropout(x, p=min(0.5, 0.2 * strength), training=True)
    return x + torch.randn_like(x) * (0.1 * strength * x.detach().std())


class LabelledPlus(Objective):
    """Base of every method that adds a term to the labelled loss: the labelled loss of :class:`Supervised`
    (the task's loss, mixup/cutmix), the term's weight (``--unlabeled-weight``), its sigmoid ramp-up
    (``--rampup``) and the pseudo-label threshold (``--threshold``)."""

    #: The term's ramp-up when ``--rampup`` is not given; a method whose paper uses none declares 0.
    default_rampup = 0.3

    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        self.supervised = Supervised(setup)
        self.weight = float(getattr(setup.settings, "unlabeled_weight", 1.0))
        self.threshold = float(getattr(setup.settings, "threshold", 0.95))
        rampup = getattr(setup.settings, "rampup", None)
        self.rampup = float(self.default_rampup if rampup is None else rampup)

    def ramp(self) -> float:
        return self.weight * sigmoid_rampup(self.step, self.setup.total_steps, self.rampup)


class SemiSupervised(LabelledPlus):
    """Base of the unlabelled-data methods: the labelled loss plus a ramped-up unlabelled term from
    :meth:`unlabelled_loss`. Without unlabelled images in the batch the labelled loss is all there is."""

    def loss(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        labelled, logs = self.supervised.loss(module, batch)
        key = unlabelled_key(batch)
        if key not in batch:
            return labelled, logs
        unlabelled, more = self.unlabelled_loss(module, batch[key], batch[f"{key}_aug"])
        weight = self.ramp()
        return labelled + weight * unlabelled, {**logs, **more, "unlabelled_loss": float(unlabelled.detach()), "weight": weight}

    def unlabelled_loss(self, module: nn.Module, plain: torch.Tensor, augmented: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def confident_targets(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(hard pseudo-labels, mask of those at least `threshold` confident, logs) from teacher logits."""
    probs = logits.detach().float().softmax(-1)
    confidence, labels = probs.max(-1)
    mask = (confidence >= threshold).float()
    return labels, mask, {"pseudo_fraction": float(mask.mean()), "confidence": float(confidence.mean())}


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the whole batch of mask x cross-entropy (FixMatch's normalisation: unconfident items count
    as zero, so the term grows as the model grows confident)."""
    return (F.cross_entropy(logits.float(), labels, reduction="none") * mask).mean()
