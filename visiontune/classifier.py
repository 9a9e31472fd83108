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
from safetensors.torch import save
from torch import nn

from visiontune.backbones.heads import MLP_HIDDEN, head_record, install_head
from visiontune.backbones.providers import read_safetensors
from visiontune.data.catalog import Skipped
from visiontune.data.transforms import Preprocessing
from visiontune.device import CPU, Device, inference_batch, loader_workers
from visiontune.evaluation.priors import reweight
from visiontune.task.kinds import Task, task_named
from visiontune.inference.stream import gather, stream_outputs
from visiontune.files import fault_point, write_bytes_whole, write_text_whole
from visiontune.errors import ArtifactError  # noqa: F401  (raised here; defined light for the CLI)

ARTIFACT_FORMAT = 1


@dataclass
class Prediction:
    """Top-k classes for one image."""

    path: str
    classes: list[str]
    probs: list[float]
    tags: list[str] | None = None  # multi-label classifiers: every class over its tuned threshold

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
    directory: Path | None = None  # the classifier folder it was saved to / loaded from
    shifted_prior: tuple[np.ndarray, np.ndarray] | None = None  # (training prior, new prior): use_prior; not saved
    device: Device = CPU  # where forward passes run (--device); not saved: a classifier file is device-free
    _engines: dict = field(default_factory=dict, repr=False)

    @property
    def train_prior(self) -> np.ndarray:
        """The class proportions the model's probabilities assume (its training images', after any logit
        adjustment), as saved with it; for a classifier trained before they were saved, `api.shift_prior`
        first fills them in from its run's split."""
        if not self.task.exclusive:
            raise ArtifactError("--prior re-weights one softmax; a multi-label classifier decides each tag by its own threshold")
        if "train_prior" not in self.extra:
            raise ArtifactError("this classifier records no training class proportions (trained before they were "
                                "saved) and its run folder is not beside it: retrain it, or pass the run folder")
        return np.asarray(self.extra["train_prior"], dtype=np.float64)

    def use_prior(self, new_prior: np.ndarray | None) -> None:
        """Predict for images with class proportions `new_prior` (None: as trained); evaluation/priors.py."""
        self.shifted_prior = None if new_prior is None else (self.train_prior, np.asarray(new_prior))

    @property
    def task(self) -> Task:
        """What the classifier predicts (single- or multi-label): activation, decisions, metrics."""
        return task_named(self.extra.get("task"), self.extra)

    @property
    def multi_label(self) -> bool:
        return self.task.tags

    def engine_forward(self, engine: str = "torch"):
        """images -> logits on `engine` (names.ENGINE_CHOICES: "auto" = onnxruntime when installed; on a GPU
        `device`, auto = torch there under autocast).

        The ONNX file is exported once per weights file into the feature cache's engines/ folder, never
        into the classifier folder."""
        from visiontune.inference.engines import compile_forward
        from visiontune.names import resolve_engine

        engine = "torch-bf16" if self.device.accelerated and engine in (None, "auto") else resolve_engine(engine)
        if engine not in self._engines:
            path = None
            if engine == "onnxruntime" and self.directory is not None:
                from visiontune.locations import default_cache_root
                from visiontune.data.images import content_hash

                digest = content_hash(self.directory / "model.safetensors")
                path = default_cache_root() / "engines" / f"{self.arch}-{self.preprocessing.input_size}-{digest[:20]}.onnx"
            model = self.model.eval().to(memory_format=torch.contiguous_format) if engine == "onnxruntime" else self.model.eval()
            self._engines[engine] = compile_forward(model, engine, self.preprocessing.input_size, path, self.device)
            self.model.to(memory_format=torch.channels_last)
        return self._engines[engine]

    def stream_probabilities(
        self, paths: Sequence[str | Path], batch_size: int = 64, skipped: list[Skipped] | None = None,
        tta: str = "none", combine: str = "mean", engine: str = "torch",
    ):
        """Yield (positions, probabilities) batch by batch; `tta` adds test-time augmentation views
        (see :mod:`visiontune.inference.tta`); unreadable files go to `skipped`."""
        from visiontune.inference.tta import tta_forward, tta_transform, tta_views

        self.model.eval()
        forward = self.engine_forward(engine)
        busy = getattr(forward, "keeps_cores_busy", False)  # wrapped below: stream_outputs cannot read it there
        paths = [Path(p) for p in paths]
        batch_size = inference_batch(self.device, self.preprocessing.input_size, batch_size)
        workers = loader_workers(self.device, 0)  # on a GPU a decoding process per core feeds it
        if tta == "none":
            batches = stream_outputs(
                forward, paths, self.preprocessing, batch_size, workers, description="predicting",
                skipped=skipped, busy_cores=busy, activation=self.task.activation,
            )
        else:
            views = tta_views(tta)
            batches = stream_outputs(
                tta_forward(forward, combine, self.task.activation), paths, self.preprocessing, max(1, batch_size // views),
                workers, description=f"predicting (TTA {tta})", transform=tta_transform(self.preprocessing, tta), skipped=skipped,
                views=views, busy_cores=busy,
            )
        for indices, probs in batches:
            yield indices, probs if self.shifted_prior is None else reweight(probs, *self.shifted_prior)

    def probabilities(
        self, paths: Sequence[str | Path], batch_size: int = 64, skipped: list[Skipped] | None = None,
        tta: str = "none", combine: str = "mean", engine: str = "torch",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(kept positions, probabilities) for image files, in input order."""
        return gather(self.stream_probabilities(paths, batch_size, skipped, tta, combine, engine), len(self.classes))

    def iter_predictions(
        self, paths: Sequence[str | Path], topk: int = 5, batch_size: int = 64, skipped: list[Skipped] | None = None,
        tta: str = "none", combine: str = "mean", engine: str = "torch",
    ):
        """Stream :class:`Prediction` objects batch by batch: memory stays flat for any folder size."""
        paths = [Path(p) for p in paths]
        for indices, probs in self.stream_probabilities(paths, batch_size, skipped, tta, combine, engine):
            yield from self.predictions_of([str(paths[i]) for i in indices], probs, topk)

    def tensor_probabilities(self, images: torch.Tensor, engine: str = "auto") -> np.ndarray:
        """Probabilities of a batch of preprocessed images (what a server decoded from uploads): the same
        engine, task activation and prior as :meth:`stream_probabilities` gives files."""
        with torch.inference_mode():
            probs = self.task.activation(self.engine_forward(engine)(images)).numpy()
        return probs if self.shifted_prior is None else reweight(probs, *self.shifted_prior)

    def predictions_of(self, names: Sequence[str], probs: np.ndarray, topk: int = 5) -> list[Prediction]:
        """Rows of probabilities -> :class:`Prediction` (top-k classes, and the task's tags where it decides
        them, e.g. every class over its tuned threshold for a multi-label classifier)."""
        k = min(topk, len(self.classes))
        top = np.argsort(-probs, axis=1)[:, :k]
        tags = self.task.decide(probs, self.classes, self.extra)
        return [Prediction(str(name), [self.classes[j] for j in top[row]], [float(probs[row, j]) for j in top[row]],
                           tags[row] if tags is not None else None) for row, name in enumerate(names)]

    def predict(
        self, images: str | Path | Sequence[str | Path], topk: int = 5, tta: str = "none"
    ) -> Prediction | list[Prediction]:
        """Top-k predictions for one image path (returns one) or several (returns a list)."""
        single = isinstance(images, (str, Path))
        results = list(self.iter_predictions([images] if single else images, topk=topk, tta=tta))
        if single:
            if not results:
                raise ArtifactError(f"{images}: could not be read as an image")
            return results[0]
        return results

    def save(self, directory: str | Path) -> Path:
        """Write `model.safetensors` + `classifier.json` into `directory` (created if needed)."""
        from visiontune.version import __version__

        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        write_bytes_whole(directory / "model.safetensors", save(state))
        fault_point("classifier-half")
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
            **head_record(self.model),
        }
        write_text_whole(directory / "classifier.json", json.dumps(meta, indent=2))  # last: its presence = complete
        self.directory = directory
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
        weights_path = directory / "model.safetensors"
        meta = read_classifier_meta(directory)
        if not weights_path.exists():
            raise ArtifactError(f"{directory}: classifier.json without model.safetensors; copy the whole folder.")
        model = timm.create_model(meta["arch"], pretrained=False, num_classes=int(meta["num_classes"]))
        install_head(model, meta.get("head", "linear"), int(meta.get("head_hidden", MLP_HIDDEN)))
        state = read_safetensors(weights_path, refuse=ArtifactError)
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
            directory=directory,
        )


def read_classifier_meta(directory: str | Path) -> dict:
    """classifier.json of a classifier folder (architecture, classes, task, metrics) without the weights."""
    meta_path = Path(directory) / "classifier.json"
    if not meta_path.exists():
        raise ArtifactError(
            f"{directory}: not a visiontune classifier (needs classifier.json and model.safetensors). "
            "Pass a run folder (runs/NAME) or its classifier/ folder."
        )
    return json.loads(meta_path.read_text())
