"""The weights folder: local weight files named after a timm architecture load like packaged ones.

`$VISIONTUNE_WEIGHTS` (default `~/.cache/visiontune/weights`) may hold e.g. `convnext_tiny.safetensors`;
`--arch convnext_tiny` then finds it with no `--weights`, and `visiontune backbones` lists it.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def weights_folder() -> Path:
    return Path(os.environ.get("VISIONTUNE_WEIGHTS", Path.home() / ".cache" / "visiontune" / "weights")).expanduser()


def local_weights(arch: str) -> Path | None:
    """The weights folder's file for `arch` (`<arch>.safetensors`, ...), if there is one."""
    for suffix in WEIGHT_SUFFIXES:
        path = weights_folder() / f"{arch}{suffix}"
        if path.is_file():
            return path
    return None
