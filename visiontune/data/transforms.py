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

from visiontune.names import AUGMENTATIONS

INTERPOLATION = {
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


def normalise(pre: Preprocessing) -> T.Compose:
    """PIL image (already sized) -> normalised float tensor, the last step of every preset."""
    return T.Compose(_to_normalised_tensor(pre))


def denormalise_uint8(tensor: torch.Tensor, pre: Preprocessing):
    """A normalised [3, H, W] tensor back to an HxWx3 uint8 array, for showing what the model saw."""
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    return ((tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8")


def _resize_crop(pre: Preprocessing) -> list:
    interp = INTERPOLATION.get(pre.interpolation, InterpolationMode.BICUBIC)
    return [T.Resize(pre.resize_size, interpolation=interp, antialias=True), T.CenterCrop(pre.input_size)]


def eval_transform(pre: Preprocessing) -> T.Compose:
    """Deterministic: resize the shorter side, centre crop, normalise. Used for caching, eval, predict."""
    return T.Compose(_resize_crop(pre) + _to_normalised_tensor(pre))


def eval_transform_uint8(pre: Preprocessing) -> T.Compose:
    """:func:`eval_transform` without its last step: a uint8 [3, H, W] tensor, to be finished a batch at a
    time by :func:`normalise_batch`. Why: normalising 32 images at once costs less than 32 times one, and
    uint8 batches are a quarter of the bytes to hand between threads or processes. Same numbers exactly."""
    return T.Compose(_resize_crop(pre) + [T.PILToTensor()])


def normalise_batch(images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> the normalised float tensor :func:`eval_transform` would have given."""
    return T.Compose(_to_normalised_tensor(pre)[1:])(images)


class PCALighting(torch.nn.Module):
    """AlexNet's lighting noise: add multiples of the principal components of ImageNet's RGB pixels,
    scaled by their eigenvalues and a N(0, alphastd) draw, so the colour shifts follow natural lighting.
    Acts on float images in [0, 1] (before normalisation)."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alphastd: float = 0.1):
        super().__init__()
        self.alphastd = alphastd

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        shift = self.EIGVEC @ (alpha * self.EIGVAL)
        return (image + shift.view(3, 1, 1)).clamp(0, 1)




def augmentation(pre: Preprocessing, preset: str = "light", min_scale: float | None = None) -> T.Compose:
    """The training transform of an augmentation preset (torchvision v2), ending normalised.

    none: as evaluation. light: random resized crop + horizontal flip. standard: + small rotation, colour
    jitter, PCA lighting. strong: wider crops, rotation, stronger jitter, blur, gaussian noise, random
    erasing. aerial: for top-down images (satellite, microscopy): horizontal + vertical flips and
    right-angle rotations, mild jitter. `min_scale` raises the crop's smallest area (cached views).
    """
    if preset not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {', '.join(AUGMENTATIONS)}")
    if preset == "none":
        return eval_transform(pre)
    interp = INTERPOLATION.get(pre.interpolation, InterpolationMode.BICUBIC)
    low = {"light": 0.35, "standard": 0.25, "strong": 0.08, "aerial": 0.35}[preset]
    low = max(low, min_scale or 0.0)
    crop = T.RandomResizedCrop(pre.input_size, scale=(low, 1.0), interpolation=interp, antialias=True)
    geometry: list = [crop, T.RandomHorizontalFlip()]
    colour: list = []
    after: list = []
    if preset == "standard":
        geometry.append(T.RandomRotation(10, interpolation=InterpolationMode.BILINEAR))
        colour = [T.ColorJitter(0.2, 0.2, 0.2), PCALighting(0.1)]
    elif preset == "strong":
        geometry.append(T.RandomRotation(20, interpolation=InterpolationMode.BILINEAR))
        colour = [
            T.ColorJitter(0.4, 0.4, 0.4, 0.05), PCALighting(0.1),
            T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.2),
            T.RandomApply([T.GaussianNoise(sigma=0.05)], p=0.3),
        ]
        after = [T.RandomErasing(p=0.25, value=0)]
    elif preset == "aerial":
        geometry += [T.RandomVerticalFlip(), T.RandomChoice([T.RandomRotation((a, a)) for a in (0, 90, 180, 270)])]
        colour = [T.ColorJitter(0.1, 0.1, 0.1)]
    return T.Compose(
        geometry + [T.ToImage(), T.ToDtype(torch.float32, scale=True)] + colour
        + [T.Normalize(mean=pre.mean, std=pre.std)] + after
    )
