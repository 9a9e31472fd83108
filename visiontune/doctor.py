"""`visiontune doctor` and `augment-preview`: the notes' sanity checks before a long run.

Doctor looks at the data (class balance, unreadable files, duplicates and conflicting labels, mean/std)
and at the pipeline: it overfits a tiny subset (a few images per class, head on cached features). If the
loss does not fall close to zero there, something between the files, the labels and the model is broken,
and no amount of training will fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from visiontune.backbones.registry import DEFAULT_ARCH, create_backbone
from visiontune.cache.features import cached_activations
from visiontune.cache.store import default_cache_root
from visiontune.data.catalog import discover
from visiontune.data.stats import duplicate_groups, mean_std
from visiontune.train.objectives import plain_objective, train_step


@dataclass
class DoctorReport:
    rows: list[tuple[str, str]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    healthy: bool = True
    overfit: dict = field(default_factory=dict)

    def table(self) -> Table:
        table = Table(title="visiontune doctor")
        table.add_column("check")
        table.add_column("result")
        for check, result in self.rows:
            table.add_row(check, result)
        return table


def overfit_tiny_subset(features: torch.Tensor, labels: torch.Tensor, steps: int = 150, lr: float = 1e-2) -> dict:
    """Train a fresh linear head on a few cached feature rows, full batch; report the loss fall."""
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], int(labels.max()) + 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    objective = plain_objective(head.out_features)
    losses = [train_step(head, objective, {"x": features, "y": labels}, optimizer)[0] for _ in range(steps)]
    accuracy = float((head(features).argmax(1) == labels).float().mean())
    return {"first_loss": losses[0], "last_loss": losses[-1], "train_accuracy": accuracy, "steps": steps}


def doctor(
    data: str | Path, labels: str | Path | None = None, arch: str = DEFAULT_ARCH, weights: str = "default",
    seed: int = 0, per_class: int = 4,
) -> DoctorReport:
    report = DoctorReport()
    source = discover(data, labels=labels)
    catalog = source.train
    paths, ys = list(catalog.paths), list(catalog.labels)
    if source.valid is not None:
        paths += source.valid.paths
        ys += source.valid.labels
    counts = catalog.class_counts()
    report.rows.append(("images", f"{len(paths)} usable, {len(source.skipped)} skipped (unreadable/corrupt)"))
    smallest, largest = min(counts.values()), max(counts.values())
    report.rows.append(("classes", f"{len(counts)}: " + ", ".join(f"{k} {v}" for k, v in counts.items())))
    ratio = largest / max(smallest, 1)
    report.rows.append(("balance", f"largest/smallest class = {ratio:.1f}"))
    if ratio >= 3:
        report.advice.append(f"classes are imbalanced ({ratio:.1f}x): try --class-weights balanced or --sampler balanced")
    for skipped in source.skipped[:5]:
        report.advice.append(f"skipped {skipped.path}: {skipped.reason}")
    groups = duplicate_groups(paths, ys)
    conflicting = [g for g in groups if len({label for _, label in g}) > 1]
    report.rows.append(("duplicates", f"{len(groups)} groups of identical files, {len(conflicting)} with different labels"))
    for group in conflicting[:5]:
        names = ", ".join(f"{p} ({catalog.classes[label]})" for p, label in group)
        report.advice.append(f"same image, different labels: {names} — fix or remove one")
        report.healthy = False
    if len(groups) > len(conflicting):
        report.advice.append("identical files can land in both train and validation and inflate accuracy; dedupe them")
    mean, std, used = mean_std(paths)
    report.rows.append(("mean / std (RGB, 0-1)", f"{mean} / {std} over {used} images (ImageNet: (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225))"))

    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(len(catalog.classes)):
        members = np.flatnonzero(np.asarray(ys) == cls)
        chosen += rng.choice(members, size=min(per_class, len(members)), replace=False).tolist()
    backbone = create_backbone(arch, weights, num_classes=len(catalog.classes))
    subset = [paths[i] for i in chosen]
    kept, rows, _ = cached_activations(backbone, subset, default_cache_root(), description="doctor")
    features = torch.from_numpy(np.asarray(rows, dtype=np.float32))
    targets = torch.tensor([ys[chosen[i]] for i in kept])
    result = overfit_tiny_subset(features, targets)
    report.overfit = result
    fell = result["last_loss"] < 0.1 * result["first_loss"] and result["train_accuracy"] == 1.0
    report.rows.append((
        f"overfit {len(kept)} images",
        f"loss {result['first_loss']:.3f} -> {result['last_loss']:.4f} in {result['steps']} steps, "
        f"train accuracy {result['train_accuracy']:.2f}: {'ok, the pipeline can learn' if fell else 'FAILED'}",
    ))
    if not fell:
        report.healthy = False
        report.advice.append("the head could not overfit a tiny subset: check the labels, the files and the backbone weights")
    return report


def augment_preview(
    data: str | Path, out: str | Path, preset: str = "standard", images: int = 4, samples: int = 6,
    img_size: int = 224, seed: int = 0,
) -> Path:
    """A grid: each row one source image, then `samples` augmented versions by `preset` (de-normalised)."""
    from visiontune.data.images import is_image_name, load_rgb
    from visiontune.data.transforms import Preprocessing, augmentation, denormalise_uint8, eval_transform
    from visiontune.report.plots import image_grid

    files = sorted(p for p in Path(data).rglob("*") if p.is_file() and is_image_name(p))
    if not files:
        raise FileNotFoundError(f"{data}: no image files found")
    picked = [files[i] for i in np.random.default_rng(seed).choice(len(files), size=min(images, len(files)), replace=False)]
    pre = Preprocessing(img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    transform, plain = augmentation(pre, preset), eval_transform(pre)
    torch.manual_seed(seed)
    rows = []
    for path in picked:
        image = load_rgb(path)
        rows.append([denormalise_uint8(plain(image), pre)] + [denormalise_uint8(transform(image), pre) for _ in range(samples)])
    return image_grid(rows, Path(out), [p.name for p in picked], title=f"--aug {preset}: original, then {samples} samples")
