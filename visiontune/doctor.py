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
from visiontune import device as devices
from visiontune.cache.features import cached_activations
from visiontune.locations import default_cache_root
from visiontune.data.catalog import discover
from visiontune.data.stats import duplicate_groups, mean_std
from visiontune.train.objectives import plain_objective, train_step


@dataclass
class DoctorReport:
    rows: list[tuple[str, str]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    healthy: bool = True
    overfit: dict = field(default_factory=dict)
    domain: dict | None = None  # with a target folder: proxy A-distance, mean shift, class shares

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
    seed: int = 0, per_class: int = 4, target: str | Path | None = None, device: str = "auto",
) -> DoctorReport:
    report = DoctorReport()
    where = devices.choose(device)
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
    kept, rows, _ = cached_activations(backbone, subset, default_cache_root(), description="doctor", device=where)
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
    if target is not None:
        report.domain = domain_shift(backbone, paths, ys, catalog.classes, target, seed, device=where)
        report.rows += report.domain.pop("rows")
        report.advice += report.domain.pop("advice")
    return report


#: Proxy A-distance bands and what they predict (0 = indistinguishable, 2 = perfectly separable). A linear
#: domain classifier on ImageNet features separates almost any two photo collections a little, so only
#: clear separations are read as shift.
PAD_BANDS = ((0.5, "close: a model trained on the source should transfer; adaptation has little to fix"),
             (1.5, "moderately apart: expect some drop on the target; --adapt (coral-cut+self-train, self-train, mmd) is worth trying"),
             (2.01, "far apart: expect a large drop on the target; adapt (--adapt auto) or label some target images"))


def domain_shift(backbone, paths: list, labels: list, classes: list[str], target: str | Path, seed: int = 0, sample: int = 1000,
                 device: devices.Device = devices.CPU) -> dict:
    """Before any training: how far the target images are from the source in the backbone's pooled
    features — the proxy A-distance from a linear domain classifier (cross-validated), the mean shift in
    units of the source spread, and per class the share of target images nearest to that class's source
    centroid against the class's share of the source (a hint of prior shift; no target label is used)."""
    from visiontune.beyond import domain_picture
    from visiontune.data.catalog import unlabelled_catalog

    rng = np.random.default_rng(seed)
    source_pick = np.sort(rng.choice(len(paths), min(len(paths), sample), replace=False))
    target_catalog = unlabelled_catalog(target, "target")
    target_pick = np.sort(rng.choice(len(target_catalog), min(len(target_catalog), sample), replace=False))
    root = default_cache_root()
    kept_s, xs, _ = cached_activations(backbone, [paths[i] for i in source_pick], root, description="doctor source", device=device)
    _, xt, _ = cached_activations(backbone, [target_catalog.paths[i] for i in target_pick], root, description="doctor target",
                                  device=device)
    xs, xt = np.asarray(xs, dtype=np.float32), np.asarray(xt, dtype=np.float32)
    picture = domain_picture(xs, xt, seed)
    ys = np.asarray(labels)[source_pick][kept_s]
    centroids = np.stack([xs[ys == c].mean(0) if (ys == c).any() else np.full(xs.shape[1], np.inf) for c in range(len(classes))])
    nearest = np.argmin(((xt[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    share = {c: (float((ys == i).mean()), float((nearest == i).mean())) for i, c in enumerate(classes)}
    pad = picture["proxy_a_distance"]
    verdict = next(text for limit, text in PAD_BANDS if pad < limit)
    rows = [("domain distance", f"proxy A-distance {pad:.2f} (0 = same, 2 = separable; domain classifier accuracy "
                                f"{picture['domain_classifier_accuracy']:.2f}), mean shift {picture['mean_shift']:.2f} source SDs"),
            ("target by nearest class", ", ".join(f"{c} {t:.0%} (source {s:.0%})" for c, (s, t) in share.items()))]
    return {"rows": rows, "advice": [f"target domain {verdict}"], **picture, "class_share": share}


def augment_preview(
    data: str | Path, out: str | Path, preset: str = "standard", images: int = 4, samples: int = 6,
    img_size: int = 224, seed: int = 0,
) -> Path:
    """A grid: each row one source image, then `samples` augmented versions by `preset` (de-normalised)."""
    from visiontune.data.catalog import files_below
    from visiontune.data.images import is_image_name, load_rgb
    from visiontune.data.transforms import Preprocessing, augmentation, denormalise_uint8, eval_transform
    from visiontune.report.plots import image_grid

    files = [p for p in files_below(Path(data)) if is_image_name(p)]
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
