"""Image -> tensor presets, all built from the backbone's own preprocessing config.

A pretrained backbone only works on inputs normalised the way it was trained (mean/std, resize
interpolation, crop fraction), so those numbers come from timm's config of the architecture and travel
with the classifier artifact; only the input size may be overridden (smaller images are much faster
on a CPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
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


class NormalisePixels(torch.nn.Module):
    """uint8 pixels [..., 3, H, W] -> the backbone's normalised float input, (x / 255 - mean) / std computed as
    one multiply into the output and one in-place add, image by image so each image's floats are still in the
    CPU's cache for the add: a fraction of ToDtype + Normalize's time (equal to them to float rounding, ~1e-7).
    Per image and per batch alike, so a batch normalised at once equals its images normalised one by one.

    In numpy, not torch: this runs in the decoding thread, and torch's OpenMP-parallel operators are ~10x
    slower outside the main thread (measured: 0.28 vs 0.03 ms per 224 px image; numpy 0.05 in either)."""

    def __init__(self, pre: Preprocessing):
        super().__init__()
        std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.shift = (-np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1) / std).astype(np.float32)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.as_subclass(torch.Tensor).numpy()
        scale = self.scale * np.float32(255.0) if pixels.dtype.kind == "f" else self.scale  # float images: [0, 1]
        result = torch.empty(pixels.shape, dtype=torch.float32)  # torch's allocator and alignment
        out = result.numpy()
        for image, slot in zip(pixels.reshape(-1, *pixels.shape[-3:]), out.reshape(-1, *pixels.shape[-3:])):
            np.multiply(image, scale, out=slot)
            np.add(slot, self.shift, out=slot)
        return result


def _to_normalised_tensor(pre: Preprocessing) -> list:
    return [T.ToImage(), NormalisePixels(pre)]


def normalise(pre: Preprocessing) -> T.Compose:
    """PIL image (already sized) -> normalised float tensor, the last step of every preset."""
    return T.Compose(_to_normalised_tensor(pre))


def denormalise_uint8(tensor: torch.Tensor, pre: Preprocessing):
    """A normalised [3, H, W] tensor back to an HxWx3 uint8 array, for showing what the model saw."""
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    return ((tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8")


class ResizeCentreCrop(torch.nn.Module):
    """`Resize(resize_size)` then `CenterCrop(input_size)`, resampling only the crop's box.

    Why: resizing the whole image and then throwing a quarter of it away (crop_pct 0.875) is the larger part of
    decoding for prediction, which runs beside the model on the same cores (28 px gray to 224: 0.13 ms instead
    of 0.41 ms plus the RGB conversion before it). Pillow's `resize(box=...)` samples a box at the positions
    the full resize would, from the same source pixels; the two passes run here in a fixed order, horizontal
    over just the rows the vertical filter reads, then vertical. Pillow's own full resize sometimes runs the
    vertical pass first, and the orders round differently in the 8-bit image between them, so this equals
    torchvision's two steps within 2 of 255 on smooth images and exactly for a 28 px square at 224 (tested).
    Grayscale images stay one channel (a third of the work). Nearest-neighbour interpolation, a crop larger
    than the resize, and tensors go through torchvision's two steps."""

    SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # Pillow's filter half-widths, in output pixels when upsampling

    def __init__(self, pre: Preprocessing):
        super().__init__()
        self.resize_size, self.crop = pre.resize_size, pre.input_size
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(pre.interpolation)
        self.support = self.SUPPORT.get(pre.interpolation, 0.0)
        interp = INTERPOLATION.get(pre.interpolation, InterpolationMode.BICUBIC)
        self.two_steps = T.Compose([T.Resize(pre.resize_size, interpolation=interp, antialias=True),
                                    T.CenterCrop(pre.input_size)])

    def forward(self, image):
        if not isinstance(image, Image.Image) or self.resample is None or self.crop > self.resize_size:
            return self.two_steps(image)
        width, height = image.size
        # torchvision's sizes: the shorter side to resize_size, the longer truncated; crop anchors rounded
        short, long = sorted((width, height))
        resized_long = int(self.resize_size * long / short)
        new_w, new_h = (self.resize_size, resized_long) if width <= height else (resized_long, self.resize_size)
        top, left = int(round((new_h - self.crop) / 2.0)), int(round((new_w - self.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        x0, x1, y0, y1 = left * sx, (left + self.crop) * sx, top * sy, (top + self.crop) * sy
        reach = self.support * max(sy, 1.0) + 1  # source rows the vertical filter may read beyond the box
        first, last = max(0, math.floor(y0 - reach)), min(height, math.ceil(y1 + reach))
        rows = image.crop((0, first, width, last)) if (first, last) != (0, height) else image
        across = rows.resize((self.crop, last - first), self.resample, box=(x0, 0, x1, last - first))
        return across.resize((self.crop, self.crop), self.resample, box=(0, y0 - first, self.crop, y1 - first))


def _as_rgb(image):
    """Gray images (kept one channel through the resize) become the RGB the backbone takes."""
    return image.convert("RGB") if isinstance(image, Image.Image) and image.mode != "RGB" else image


def _resize_crop(pre: Preprocessing) -> list:
    return [ResizeCentreCrop(pre), _as_rgb]


def eval_transform(pre: Preprocessing) -> T.Compose:
    """Deterministic: resize the shorter side, centre crop, normalise. Used for caching, eval, predict."""
    return T.Compose(_resize_crop(pre) + _to_normalised_tensor(pre))


class EvalPixels:
    """PIL image -> the centre crop's uint8 pixels [3, H, W]: :func:`eval_transform` without normalising.

    Plain calls instead of a torchvision Compose, whose dispatch per step costs about as much as the resize
    itself on small images (this runs once per image of every prediction, beside the model)."""

    def __init__(self, pre: Preprocessing):
        self.resize_crop = ResizeCentreCrop(pre)

    def __call__(self, image) -> torch.Tensor:
        cropped = self.resize_crop.forward(image)
        if not isinstance(cropped, Image.Image):  # a tensor went through torchvision's steps
            return T.ToImage()(cropped).as_subclass(torch.Tensor)
        return torch.from_numpy(np.array(_as_rgb(cropped))).permute(2, 0, 1)


def eval_transform_uint8(pre: Preprocessing) -> EvalPixels:
    """:func:`eval_transform` without its last step: a uint8 [3, H, W] tensor, to be finished a batch at a
    time by :func:`normalise_batch`. Why: normalising 32 images at once costs less than 32 times one, and
    uint8 batches are a quarter of the bytes to hand between threads or processes. Same numbers exactly."""
    return EvalPixels(pre)


def normalise_batch(images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> the normalised float tensor :func:`eval_transform` would have given."""
    return NormalisePixels(pre)(images)


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
