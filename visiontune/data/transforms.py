"""Image -> tensor presets, all built from the backbone's own preprocessing config.

A pretrained backbone only works on inputs normalised the way it was trained (mean/std, resize
interpolation, crop fraction), so those numbers come from timm's config of the architecture and travel
with the classifier artifact; only the input size may be overridden (smaller images are much faster
on a CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB images become the backbone's input tensors."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @classmethod
    def from_timm(cls, data_config: dict) -> Preprocessing:
        """From `timm.data.resolve_data_config(...)` output."""
        return cls(
            input_size=int(data_config["input_size"][-1]),
            mean=tuple(float(x) for x in data_config["mean"]),
            std=tuple(float(x) for x in data_config["std"]),
            interpolation=str(data_config.get("interpolation", "bicubic")),
            crop_pct=float(data_config.get("crop_pct", 0.875)),
        )

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bicubic"),
            crop_pct=float(data.get("crop_pct", 0.875)),
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    def with_size(self, size: int | None) -> Preprocessing:
        """The same preprocessing at another input size (None keeps it)."""
        return self if size is None else replace(self, input_size=int(size))

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop, as timm computes it (size / crop_pct)."""
        return int(round(self.input_size / self.crop_pct))


def _to_normalised_tensor(pre: Preprocessing) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=pre.mean, std=pre.std)]


def eval_transform(pre: Preprocessing) -> T.Compose:
    """Deterministic: resize the shorter side, centre crop, normalise. Used for caching, eval, predict."""
    interp = _INTERPOLATION.get(pre.interpolation, InterpolationMode.BICUBIC)
    return T.Compose(
        [T.Resize(pre.resize_size, interpolation=interp, antialias=True), T.CenterCrop(pre.input_size)]
        + _to_normalised_tensor(pre)
    )


def train_transform(pre: Preprocessing, scale: tuple[float, float] = (0.35, 1.0)) -> T.Compose:
    """Light augmentation: random resized crop (area fraction in `scale`) and horizontal flip.

    Used for fine-tuning on images and, with a milder `scale`, for cached augmented views.
    The full augmentation presets (issue C) extend this.
    """
    interp = _INTERPOLATION.get(pre.interpolation, InterpolationMode.BICUBIC)
    return T.Compose(
        [
            T.RandomResizedCrop(pre.input_size, scale=scale, interpolation=interp, antialias=True),
            T.RandomHorizontalFlip(),
        ]
        + _to_normalised_tensor(pre)
    )
