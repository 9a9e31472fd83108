"""Offline demo datasets written out as ordinary image folders (what a user would point visiontune at).

* ``digits``: scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes), always available.
* ``fashion-mnist``: from the Debian package ``dataset-fashion-mnist`` (IDX files), as a seeded,
  class-balanced ``train/`` + ``valid/`` layout (valid drawn from the official test split).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.data.catalog import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]


def _fresh(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"{dest}: already exists and is not empty; choose another folder or reuse it as is.")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def export_digits(dest: str | Path) -> Path:
    """scikit-learn digits as `dest/<digit>/<n>.png` (8x8 grayscale, 0-255)."""
    from sklearn.datasets import load_digits

    dest = _fresh(Path(dest))
    digits = load_digits()
    for n, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = dest / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8)).save(folder / f"{n:04d}.png")
    return dest


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzip or plain."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,28,28] uint8, labels [N]) for split "train" or "test"."""
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise DataError(
            f"{images}: Fashion-MNIST not installed. Install it with: apt-get install dataset-fashion-mnist"
        )
    return read_idx(images), read_idx(labels)


def _balanced_sample(labels: np.ndarray, per_class: int | dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """`per_class` images of each class (a dict gives some classes other counts: an imbalanced sample)."""
    counts = per_class if isinstance(per_class, dict) else {}
    default = per_class if isinstance(per_class, int) else None
    picks = [rng.choice(np.flatnonzero(labels == c), counts.get(int(c), default), replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def export_fashion_mnist(dest: str | Path, train_per_class: int = 200, valid_per_class: int = 200, seed: int = 0,
                         scarce: dict[str, int] | None = None) -> Path:
    """Seeded class-balanced Fashion-MNIST subset as `dest/train/<class>/*.png`, `dest/valid/<class>/*.png`;
    `scarce` gives some classes fewer training images (an imbalanced training set, balanced validation)."""
    rng = np.random.default_rng(seed)
    if scarce:
        train_per_class = {**{c: train_per_class for c in range(len(FASHION_CLASSES))},
                           **{FASHION_CLASSES.index(name): n for name, n in scarce.items()}}
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    dest = _fresh(Path(dest))
    for part, (xs, ys), per_class in (("train", (train_x, train_y), train_per_class), ("valid", (test_x, test_y), valid_per_class)):
        for i in _balanced_sample(ys, per_class, rng):
            folder = dest / part / FASHION_CLASSES[ys[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(xs[i]).save(folder / f"{part}-{i:05d}.png")
    return dest


DEMOS = {"digits": export_digits, "fashion-mnist": export_fashion_mnist}
