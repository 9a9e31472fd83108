"""The epoch loops: a head phase on cached features, and a fine-tune phase on images.

Both report one record per epoch to `log` (the run's metrics.jsonl) and take their settings from the
:class:`~visiontune.train.plan.Plan`. The head phase trains exactly the classifier that sits on the
backbone, so after it the full model predicts what the cached-feature head predicted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.backbones.cuts import Tail
from visiontune.cache.store import CachedRows
from visiontune.data.catalog import Catalog, Skipped
from visiontune.data.loader import ImageFiles, iterate_batches
from visiontune.data.transforms import Preprocessing, train_transform
from visiontune.inference import collect_outputs
from visiontune.progress import progress_bar, track
from visiontune.train.plan import Plan

Log = Callable[[dict], None]
Rows = np.ndarray | CachedRows  # cached activations: in memory, or read batch by batch from the store


def _evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    return {
        "valid_loss": float(F.cross_entropy(logits, labels)),
        "valid_accuracy": float((logits.argmax(1) == labels).float().mean()),
    }


def train_cached(
    tail: Tail,
    train_views: list[Rows],
    train_y: np.ndarray,
    valid_x: Rows,
    valid_y: np.ndarray,
    plan: Plan,
    log: Log,
    phase: str = "head",
) -> list[dict]:
    """Train a tail (classifier, or last blocks + classifier) in place on cached activations.

    `train_views` holds one array per cached view of the training images (row i = image i in every
    view); each epoch draws, per image, one view at random, so augmentation survives caching. The
    classifier starts at zero (uniform predictions, loss = log(classes)): timm's default init is scaled
    for its own features and starts a fresh head with huge logits, which measurably cost accuracy
    (digits: 0.894 vs 0.942 at the same epochs). Blocks in the tail learn `plan.lr_mult` times slower
    than the classifier (differential learning rates), and their BatchNorm statistics stay fixed with
    `plan.bn_freeze`.
    """
    classifier = tail.model.get_classifier()
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    for p in tail.trainable_parameters():
        p.requires_grad_(True)
    groups = _param_groups(tail.trainable_parameters(), classifier, plan.lr, plan.lr_mult)
    generator = torch.Generator().manual_seed(plan.seed)
    y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    vy = torch.from_numpy(np.asarray(valid_y, dtype=np.int64))
    n = len(y)
    steps_per_epoch = max(1, -(-n // plan.batch_size))
    optimizer = torch.optim.AdamW(groups, weight_decay=plan.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=plan.epochs * steps_per_epoch
    )
    history = []
    for epoch in track(range(plan.epochs), f"training {phase}"):
        started = time.perf_counter()
        tail.train()
        if plan.bn_freeze:
            for bn in tail.batchnorms():
                bn.eval()
        order = torch.randperm(n, generator=generator)
        choice = torch.randint(len(train_views), (n,), generator=generator)
        total = 0.0
        for start in range(0, n, plan.batch_size):
            batch = order[start : start + plan.batch_size]
            inputs = _gather_views(train_views, batch.numpy(), choice[batch].numpy())
            loss = F.cross_entropy(tail(inputs), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        tail.eval()
        record = {"phase": phase, "epoch": epoch + 1, "train_loss": total / n}
        if len(vy):
            record.update(_evaluate_logits(predict_cached(tail, valid_x), vy))
        record["seconds"] = round(time.perf_counter() - started, 3)
        log(record)
        history.append(record)
    return history


def _rows(source: Rows, indices: np.ndarray) -> torch.Tensor:
    """float32 rows of an in-memory array or of lazily read cached rows, channels-last for maps."""
    rows = source.take(indices) if isinstance(source, CachedRows) else np.asarray(source[indices], dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def _gather_views(views: list[Rows], indices: np.ndarray, chosen: np.ndarray) -> torch.Tensor:
    """One batch: image indices[k] taken from view chosen[k], read view by view (only this batch in RAM)."""
    parts = {int(v): _rows(views[int(v)], indices[chosen == v]) for v in np.unique(chosen)}
    sample = next(iter(parts.values()))
    batch = torch.empty((len(indices), *sample.shape[1:]), dtype=sample.dtype)
    for v, rows in parts.items():
        batch[torch.from_numpy(chosen == v)] = rows
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch


def predict_cached(tail: Tail, inputs: Rows, batch_size: int = 256) -> torch.Tensor:
    """Logits of a tail on cached activations, in batches, without autograd."""
    tail.eval()
    with torch.inference_mode():
        parts = [
            tail(_rows(inputs, np.arange(start, min(start + batch_size, len(inputs)))))
            for start in range(0, len(inputs), batch_size)
        ]
    return torch.cat(parts) if parts else torch.empty(0)


def _set_trainable(model: nn.Module, unfreeze_groups: int) -> list[nn.Module]:
    """Freeze all but the top `unfreeze_groups` layer groups (timm's group_matcher; -1 = all).

    Returns the frozen modules so their BatchNorm layers can be kept in eval mode (stats not updated).
    """
    groups = timm.models.group_modules(model, model.group_matcher(coarse=True))
    order = sorted(groups)
    classifier = {name for name, _ in model.get_classifier().named_modules(prefix="classifier")}
    trainable_ids = order if unfreeze_groups < 0 else order[len(order) - unfreeze_groups :]
    trainable = {name for gid in trainable_ids for name in groups[gid]} | classifier
    frozen = []
    for name, module in model.named_modules():
        if not name or any(name == t or name.startswith(t + ".") for t in trainable):
            continue
        if not list(module.children()):
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
            frozen.append(module)
    return frozen


def _param_groups(params, classifier: nn.Module, lr: float, lr_mult: float) -> list[dict]:
    """Differential learning rates: the classifier at `lr`, every other trained parameter at `lr / lr_mult`."""
    head = {id(p) for p in classifier.parameters()}
    params = list(params)
    groups = [
        {"params": [p for p in params if id(p) in head], "lr": lr},
        {"params": [p for p in params if id(p) not in head], "lr": lr / lr_mult},
    ]
    return [g for g in groups if g["params"]]


def finetune(
    model: nn.Module,
    train: Catalog,
    valid: Catalog,
    preprocessing: Preprocessing,
    plan: Plan,
    log: Log,
    checkpoints: Path,
    skipped: list[Skipped],
    workers: int = 1,
) -> list[dict]:
    """Fine-tune the top `plan.unfreeze_groups` groups on augmented images; BN of frozen parts stays fixed."""
    from safetensors.torch import save_file

    frozen = _set_trainable(model, plan.unfreeze_groups)
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = _param_groups(trained, model.get_classifier(), plan.finetune_lr, plan.lr_mult)
    optimizer = torch.optim.AdamW(groups, weight_decay=plan.weight_decay)
    dataset = ImageFiles(train.paths, train.labels, train_transform(preprocessing), preprocessing.input_size)
    steps_per_epoch = max(1, -(-len(dataset) // plan.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=plan.finetune_epochs * steps_per_epoch,
        pct_start=0.2,
    )
    model.to(memory_format=torch.channels_last)
    history = []
    seen_failures: set[str] = set()
    for epoch in range(plan.finetune_epochs):
        started = time.perf_counter()
        model.train()
        for module in frozen:
            module.eval()
        if plan.bn_freeze:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        total, count = 0.0, 0
        batches = iterate_batches(dataset, plan.batch_size, shuffle=True, seed=plan.seed + epoch, workers=workers)
        with progress_bar() as bar:
            task = bar.add_task(f"fine-tune epoch {epoch + 1}/{plan.finetune_epochs}", total=len(dataset))
            for batch in batches:
                for _, path, reason in batch.failed:
                    if path not in seen_failures:
                        seen_failures.add(path)
                        skipped.append(Skipped(path, reason))
                bar.advance(task, len(batch.indices) + len(batch.failed))
                if len(batch.indices) == 0:
                    continue
                images = batch.images.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(images), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(batch.indices)
                count += len(batch.indices)
        model.eval()
        kept, logits = collect_outputs(model, valid.paths, preprocessing, plan.batch_size, workers, "validating")
        record = {"phase": "finetune", "epoch": epoch + 1, "train_loss": total / max(count, 1)}
        record.update(_evaluate_logits(torch.from_numpy(logits), torch.tensor(valid.labels)[kept]))
        record["seconds"] = round(time.perf_counter() - started, 3)
        log(record)
        history.append(record)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(checkpoints / "last.safetensors"), metadata={"epoch": str(epoch + 1)})
    for param in model.parameters():
        param.requires_grad_(True)
    return history
