"""The trained classifier: backbone + head + class names + preprocessing, saved without pickle.

Artifact = one directory: ``model.safetensors`` (the whole timm model's tensors) and ``classifier.json``
(architecture, classes, preprocessing, metrics, visiontune version). Loading builds the timm architecture
with random weights and fills it from the safetensors file, so opening a downloaded classifier can never
run code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from visiontune.data.catalog import Skipped
from visiontune.data.transforms import Preprocessing
from visiontune.inference import collect_outputs, stream_outputs

ARTIFACT_FORMAT = 1


class ArtifactError(Exception):
    """A classifier directory that cannot be loaded; the message says why."""


@dataclass
class Prediction:
    """Top-k classes for one image."""

    path: str
    classes: list[str]
    probs: list[float]

    @property
    def label(self) -> str:
        return self.classes[0]


@dataclass
class Classifier:
    """A model ready to predict, with everything needed to preprocess its inputs."""

    model: nn.Module
    arch: str
    classes: list[str]
    preprocessing: Preprocessing
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    run_dir: Path | None = None

    def probabilities(
        self, paths: Sequence[str | Path], batch_size: int = 64, skipped: list[Skipped] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(kept positions, softmax probabilities) for image files; unreadable files go to `skipped`."""
        self.model.eval()
        return collect_outputs(
            self._softmax, [Path(p) for p in paths], self.preprocessing, batch_size, description="predicting",
            skipped=skipped,
        )

    def iter_predictions(
        self, paths: Sequence[str | Path], topk: int = 5, batch_size: int = 64, skipped: list[Skipped] | None = None
    ):
        """Stream :class:`Prediction` objects batch by batch: memory stays flat for any folder size."""
        self.model.eval()
        paths = [Path(p) for p in paths]
        k = min(topk, len(self.classes))
        for indices, probs in stream_outputs(
            self._softmax, paths, self.preprocessing, batch_size, description="predicting", skipped=skipped
        ):
            top = np.argsort(-probs, axis=1)[:, :k]
            for row, index in enumerate(indices):
                yield Prediction(
                    str(paths[index]),
                    [self.classes[j] for j in top[row]],
                    [float(probs[row, j]) for j in top[row]],
                )

    def predict(self, images: str | Path | Sequence[str | Path], topk: int = 5) -> Prediction | list[Prediction]:
        """Top-k predictions for one image path (returns one) or several (returns a list)."""
        single = isinstance(images, (str, Path))
        results = list(self.iter_predictions([images] if single else images, topk=topk))
        if single:
            if not results:
                raise ArtifactError(f"{images}: could not be read as an image")
            return results[0]
        return results

    def _softmax(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).softmax(dim=-1)

    def save(self, directory: str | Path) -> Path:
        """Write `model.safetensors` + `classifier.json` into `directory` (created if needed)."""
        from visiontune import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        meta = {
            "format": ARTIFACT_FORMAT,
            "visiontune_version": __version__,
            "arch": self.arch,
            "num_classes": len(self.classes),
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "input_size": self.preprocessing.input_size,
            "metrics": self.metrics,
            **self.extra,
        }
        (directory / "classifier.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Classifier:
        """Load from a classifier directory or a run directory (its `classifier/`)."""
        directory = Path(directory)
        if (directory / "classifier" / "classifier.json").exists():
            run_dir: Path | None = directory
            directory = directory / "classifier"
        else:
            run_dir = directory.parent if directory.name == "classifier" else None
        meta_path = directory / "classifier.json"
        weights_path = directory / "model.safetensors"
        if not meta_path.exists() or not weights_path.exists():
            raise ArtifactError(
                f"{directory}: not a visiontune classifier (needs classifier.json and model.safetensors). "
                "Pass a run folder (runs/NAME) or its classifier/ folder."
            )
        meta = json.loads(meta_path.read_text())
        model = timm.create_model(meta["arch"], pretrained=False, num_classes=int(meta["num_classes"]))
        state = load_file(str(weights_path), device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ArtifactError(f"{weights_path}: tensors do not match {meta['arch']} ({len(missing)} missing)")
        model.eval()
        model = model.to(memory_format=torch.channels_last)
        known = {"format", "visiontune_version", "arch", "num_classes", "classes", "preprocessing", "input_size", "metrics"}
        return cls(
            model=model,
            arch=meta["arch"],
            classes=list(meta["classes"]),
            preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
            metrics=meta.get("metrics", {}),
            extra={k: v for k, v in meta.items() if k not in known},
            run_dir=run_dir,
        )
