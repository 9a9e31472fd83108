"""Losses for single-label classification: cross-entropy (softmax + NLL), label smoothing, focal loss,
class weights — and the batch-level tricks that need soft targets (mixup, cutmix).

Every loss takes integer labels or soft targets (rows summing to 1, from mixup/cutmix), so the tricks
combine freely.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from visiontune.errors import UsageError

LOSSES = ("ce", "focal")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """'balanced': n / (k * count_c) per class (scikit-learn's rule), so each class weighs the same in total."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise UsageError(f"unknown class weighting {mode!r}; use none or balanced")
    present = np.unique(labels)
    weights = np.ones(n_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(weights)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float, weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma, so examples the model
    already gets right contribute little and the hard ones dominate. gamma=0 is plain cross-entropy."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    soft = _soft_targets(targets, logits.shape[-1], label_smoothing)
    per_class = soft * (1 - log_p.exp()).pow(gamma) * log_p
    if weight is not None:
        per_class = per_class * weight.to(per_class.device)
    return -per_class.sum(-1).mean()


def _soft_targets(targets: torch.Tensor, n_classes: int, smoothing: float) -> torch.Tensor:
    soft = F.one_hot(targets, n_classes).float() if targets.dim() == 1 else targets.float()
    return soft * (1 - smoothing) + smoothing / n_classes if smoothing else soft


def make_loss(name: str, label_smoothing: float = 0.0, focal_gamma: float = 2.0, weight: torch.Tensor | None = None) -> Loss:
    """The training loss chosen by the plan; validation always reports plain cross-entropy (or BCE).

    ``bce`` is multi-label: one sigmoid per class against multi-hot targets, smoothed towards 0.5."""
    if name == "bce":
        s = label_smoothing
        return lambda logits, targets: F.binary_cross_entropy_with_logits(logits.float(), targets.float() * (1 - s) + s / 2)
    if name == "ce":
        return lambda logits, targets: F.cross_entropy(logits.float(), targets, weight=None if weight is None else weight.to(logits.device),
                                                                 label_smoothing=label_smoothing)
    if name == "focal":
        return lambda logits, targets: focal_loss(logits, targets, focal_gamma, weight, label_smoothing)
    raise UsageError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def mix_batch(
    inputs: torch.Tensor, labels: torch.Tensor, n_classes: int, mixup: float, cutmix: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (blend two examples) or cutmix (paste a box of one into another), targets mixed alike.

    Works on images and on cached activations (feature maps, or pooled vectors for mixup), which is why
    it is written here rather than taken from torchvision's image-only v2.MixUp/CutMix. Draws from the
    global torch generator, whose state checkpoints save, so a resumed run mixes the same pairs.
    With both enabled, each batch uses one of them at random. Returns (inputs, soft targets).
    """
    can_cut = cutmix > 0 and inputs.dim() == 4
    use_cut = can_cut and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cut else mixup
    one_hot = labels.float() if labels.dim() == 2 else F.one_hot(labels, n_classes).float()  # multi-hot as is
    if alpha <= 0:
        return inputs, one_hot
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(labels))
    if use_cut:
        h, w = inputs.shape[-2:]
        ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        inputs = inputs.clone()
        inputs[:, :, y0:y1, x0:x1] = inputs[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        inputs = lam * inputs + (1 - lam) * inputs[perm]
    return inputs, lam * one_hot + (1 - lam) * one_hot[perm]
