"""Shared fixtures: small synthetic image folders, a private feature cache for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Class name -> base colour; images are that colour with noise and a random bright square,
#: easy for pretrained features to separate, so end-to-end tests can assert high accuracy.
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_image(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 48) -> Image.Image:
    base = np.array(colour, dtype=np.float32)[None, None, :]
    noise = rng.normal(0, 25, size=(size, size, 3))
    arr = np.clip(base + noise, 0, 255)
    x, y = rng.integers(0, size - 12, size=2)
    arr[y : y + 12, x : x + 12] = 255
    return Image.fromarray(arr.astype(np.uint8))


def write_class_folders(root: Path, per_class: int = 12, seed: int = 0, classes=COLOURS) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(colour, rng).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache so tests never see each other's features."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "data")
