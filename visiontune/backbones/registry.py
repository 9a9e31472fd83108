"""Architecture name -> timm model with weights, its preprocessing, and its layer groups.

Every backbone is a plain timm model, so the rest of visiontune relies only on timm's uniform API
(`forward_features`, `forward_head(pre_logits=True)`, `reset_classifier`, `group_matcher`) and any timm
architecture works once it has weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from visiontune.backbones.weights_folder import local_weights, weights_folder
from visiontune.backbones.providers import (
    PACKAGED,
    WeightsError,
    file_digest,
    load_from_hub,
    load_into,
    package_installed,
    package_version,
    read_state_dict,
)
from visiontune.data.transforms import Preprocessing

DEFAULT_ARCH = "tf_efficientnet_lite0"

#: Friendly names users type -> the timm architecture whose padding matches the packaged weights.
ALIASES = {
    alias.format(i=i): f"tf_efficientnet_lite{i}"
    for i in (0, 1, 2)
    for alias in ("lite{i}", "efficientnet_lite{i}", "efficientnet-lite{i}")
}


@dataclass
class Backbone:
    """A timm model (with a classifier for `num_classes`), where its weights came from, and its inputs."""

    model: nn.Module
    arch: str
    weights: str  # human-readable source
    weights_id: str  # content identity, for cache keys
    preprocessing: Preprocessing
    source_head: nn.Linear | None = None  # the weights file's own classifier (ImageNet), when it had one
    weights_sha256: str = ""  # SHA-256 of the weights file ("" for hub/none), recorded in config.yaml

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)


def resolve_arch(name: str) -> str:
    """A timm architecture name from a user's spelling, with a helpful error for unknown names."""
    arch = ALIASES.get(name, name)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise WeightsError(f"unknown architecture {name!r}.{hint}")
    return arch


def _preprocessing(model: nn.Module, img_size: int | None) -> Preprocessing:
    config = timm.data.resolve_data_config({}, model=model)
    return Preprocessing.from_timm(config).with_size(img_size)


def create_backbone(
    arch: str = DEFAULT_ARCH,
    weights: str | Path = "default",
    num_classes: int = 0,
    img_size: int | None = None,
) -> Backbone:
    """Build `arch` with weights from `weights`: "default" (packaged), "none", "hub" or a file path.

    The classifier is freshly initialised for `num_classes` (0 = none, features only).
    """
    arch = resolve_arch(arch)
    source = str(weights)
    if source == "hub":
        model = load_from_hub(arch, num_classes)
        return Backbone(model, arch, "hub", f"hub:{arch}", _preprocessing(model, img_size))
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    model = model.to(memory_format=torch.channels_last)  # ~1.7x faster convolutions on CPU
    if source == "none":
        warnings.warn(f"{arch}: random initialisation (--weights none); expect far lower accuracy.", stacklevel=2)
        return Backbone(model, arch, "none", "none", _preprocessing(model, img_size))
    if source in ("default", "package"):
        local = local_weights(arch)
        if arch in PACKAGED and (local is None or package_installed(PACKAGED[arch])):
            package = PACKAGED[arch]
            path = package.path()
            label = f"package:{package.distribution}=={package_version(package.distribution)}"
        elif local is not None:
            path, label = local, f"file:{local}"
        else:
            raise WeightsError(
                f"no offline weights are bundled for {arch}. Pass --weights PATH (.safetensors/.pth), put "
                f"{arch}.safetensors in the weights folder {weights_folder()}, use --weights hub (needs internet) "
                "or --weights none (random init). `visiontune backbones` lists what loads offline."
            )
    else:
        path = Path(source).expanduser()
        label = f"file:{path}"
    source_state = load_into(model, read_state_dict(path))
    digest = file_digest(path)
    return Backbone(
        model, arch, label, digest[:16], _preprocessing(model, img_size), _linear(source_state), weights_sha256=digest
    )


def _linear(state: dict[str, torch.Tensor]) -> nn.Linear | None:
    """A frozen Linear layer from a classifier's `weight`/`bias` tensors, if they form one."""
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or weight.dim() != 2:
        return None
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False).eval()
