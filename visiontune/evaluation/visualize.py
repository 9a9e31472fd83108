"""What the network looks at: first-layer kernels, feature maps, dead activations, Grad-CAM.

* kernels: the first convolution's filters, each rescaled to [0, 1], as RGB tiles;
* feature maps: the channels of any named module's output for one image (forward hook);
* dead activations: per activation layer, the fraction of outputs that are exactly zero over a batch —
  a ReLU layer near 100 % has died;
* Grad-CAM (Selvaraju et al. 2017): the last conv block's maps weighted by the mean gradient of the
  class score, rectified, upsampled over the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def kernel_tiles(model: nn.Module) -> list[np.ndarray]:
    """The first conv layer's filters as uint8 HxWx3 tiles (each min-max scaled on its own)."""
    weight = first_conv(model).weight.detach().float()
    tiles = []
    for kernel in weight:
        k = kernel[:3] if kernel.shape[0] >= 3 else kernel.repeat(3, 1, 1)[:3]
        k = (k - k.min()) / (k.max() - k.min() + 1e-8)
        tiles.append((k.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return tiles


def feature_maps(model: nn.Module, image: torch.Tensor, layer: str, limit: int = 16) -> np.ndarray:
    """[channels, H, W] output of module `layer` for one preprocessed image (first `limit` channels)."""
    module = dict(model.named_modules())[layer]
    captured: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("out", o.detach()))
    try:
        with torch.inference_mode():
            model.eval()(image.unsqueeze(0))
    finally:
        handle.remove()
    return captured["out"][0, :limit].float().numpy()


#: Hand-made kernels every image-processing course starts with (what "a convolution" does).
CLASSIC_KERNELS = {
    "blur": np.full((5, 5), 1 / 25),
    "sharpen": np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]),
    "Sobel x (vertical edges)": np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]),
    "Sobel y (horizontal edges)": np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]),
    "emboss": np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]),
    "Laplacian (all edges)": np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]]),
}


def classic_responses(gray: np.ndarray) -> dict[str, np.ndarray]:
    """Each classic kernel convolved with a grayscale image (HxW, 0-255), 'same' size, as float arrays."""
    image = torch.from_numpy(np.asarray(gray, dtype=np.float32))[None, None]
    out = {}
    for name, kernel in CLASSIC_KERNELS.items():
        k = torch.from_numpy(np.asarray(kernel, dtype=np.float32))[None, None]
        out[name] = F.conv2d(F.pad(image, [k.shape[-1] // 2] * 4, mode="replicate"), k)[0, 0].numpy()
    return out


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish)


def dead_activation_fractions(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Per activation module: fraction of its outputs that are exactly zero on `images`."""
    fractions: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ACTIVATIONS):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: fractions.__setitem__(name, float((o == 0).float().mean()))
            ))
    try:
        with torch.inference_mode():
            model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    return fractions


def target_layer(model: nn.Module) -> nn.Module:
    """The last spatial feature layer Grad-CAM reads (timm EfficientNet/MobileNet: bn2 after conv_head)."""
    for name in ("bn2", "conv_head", "norm_pre", "stages", "layer4", "features"):
        if hasattr(model, name):
            return getattr(model, name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


def grad_cam(model: nn.Module, image: torch.Tensor, class_index: int | None = None) -> tuple[np.ndarray, int]:
    """(heat map in [0, 1] at the image's size, explained class) for one preprocessed image [3, H, W]."""
    layer = target_layer(model)
    store: dict[str, torch.Tensor] = {}
    forward = layer.register_forward_hook(lambda m, i, o: store.__setitem__("maps", o))
    try:
        model.eval()
        x = image.unsqueeze(0).requires_grad_(False)
        with torch.enable_grad():
            logits = model(x)
            index = int(logits.argmax(1)) if class_index is None else class_index
            maps = store["maps"]
            grads = torch.autograd.grad(logits[0, index], maps)[0]
    finally:
        forward.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / (cam.max() + 1e-8)
    return cam.detach().numpy(), index


def overlay(image_uint8: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heat map (jet colours) over an RGB uint8 image."""
    import matplotlib

    colours = (matplotlib.colormaps["jet"](heat)[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * image_uint8.astype(np.float32) + alpha * colours).clip(0, 255).astype(np.uint8)
