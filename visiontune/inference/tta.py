"""Test-time augmentation: several deterministic views of each image, probabilities averaged.

Modes: ``flip`` (+ horizontal flip), ``flips`` (+ horizontal, vertical and diagonal — transpose — flips,
for top-down images), ``5crop`` / ``10crop`` (AlexNet: four corners and the centre of the resized image,
10crop adds their mirror images), ``scale`` (centre crops at 0.9x / 1x / 1.15x of the input's resize).
Combination: arithmetic mean of probabilities, or the geometric mean (renormalised), which punishes a
class any view finds unlikely.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from visiontune.data.transforms import Preprocessing, INTERPOLATION, eval_transform, normalise
from visiontune.names import COMBINE, TTA_MODES


def tta_transform(pre: Preprocessing, mode: str) -> Callable:
    """PIL image -> tensor [views, 3, H, W] (for flips and scale the first view is the plain one; the
    crops are FiveCrop/TenCrop's: corners and centre, then their mirror images)."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose from {', '.join(TTA_MODES)}")
    plain = eval_transform(pre)
    interp = INTERPOLATION.get(pre.interpolation, InterpolationMode.BICUBIC)
    if mode in ("none", "flip", "flips"):
        def flips(image):
            x = plain(image)
            views = [x]
            if mode != "none":
                views.append(x.flip(-1))
            if mode == "flips":
                views += [x.flip(-2), x.transpose(-1, -2)]
            return torch.stack(views)
        return flips
    if mode in ("5crop", "10crop"):
        resize = T.Resize(pre.resize_size, interpolation=interp, antialias=True)
        crops = T.FiveCrop(pre.input_size) if mode == "5crop" else T.TenCrop(pre.input_size)
        norm = normalise(pre)

        def cropped(image):
            return torch.stack([norm(c) for c in crops(resize(image))])
        return cropped
    norm = normalise(pre)

    def scaled(image):
        views = []
        for factor in (1.0, 0.9, 1.15):
            size = max(pre.input_size, int(round(pre.resize_size * factor)))
            views.append(norm(T.CenterCrop(pre.input_size)(T.Resize(size, interpolation=interp, antialias=True)(image))))
        return torch.stack(views)
    return scaled


def tta_views(mode: str) -> int:
    return {"none": 1, "flip": 2, "flips": 4, "5crop": 5, "10crop": 10, "scale": 3}[mode]


def combine(probs: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """[batch, views, classes] probabilities -> [batch, classes]."""
    if how == "mean":
        return probs.mean(1)
    if how == "geometric":
        logp = probs.clamp_min(1e-12).log().mean(1)
        return logp.softmax(-1)
    raise ValueError(f"unknown TTA combination {how!r}; choose from {', '.join(COMBINE)}")


def tta_forward(
    model: Callable[[torch.Tensor], torch.Tensor], how: str = "mean", activate: Callable | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a logits model to take [batch, views, 3, H, W] and return combined probabilities
    (`activate`: logits -> probabilities, softmax by default; geometric combination is softmax-only)."""
    activate = activate or (lambda logits: logits.float().softmax(-1))

    def forward(images: torch.Tensor) -> torch.Tensor:
        b, v = images.shape[:2]
        probs = activate(model(images.flatten(0, 1))).view(b, v, -1)
        return combine(probs, how)
    return forward
