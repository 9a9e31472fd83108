"""The two training phases as :class:`~visiontune.train.loop.Phase` objects.

* cached: the tail (classifier, or last blocks + classifier) on stored trunk activations, one cached
  view drawn per image per epoch so augmentation survives caching;
* fine-tune: the top layer groups on augmented images (``--unfreeze``/``--freeze-to``/``--gradual``),
  the rest frozen with its BatchNorm statistics fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune import device as devices
from visiontune import distributed
from visiontune.device import device_of, following, loader_workers, move
from visiontune.backbones.cuts import Tail
from visiontune.backbones.heads import output_layer
from visiontune.backbones.groups import group_index, layer_groups, param_groups
from visiontune.cache.store import CachedRows
from visiontune.data.catalog import Catalog, Skipped
from visiontune.data.loader import ImageFiles, iterate_batches
from visiontune.data.transforms import Preprocessing, augmentation, eval_transform
from visiontune.inference.stream import collect_outputs
from visiontune.train.checkpoint import Checkpoint
from visiontune.evaluation.hard_examples import read_upweighted
from visiontune.task.kinds import SingleLabel, Task
from visiontune.train.loop import Log, Phase, balanced_sample_weights, epoch_order, run_phase
from visiontune.train.plan import Plan

class DeviceRows:
    """Cached rows held on a device as fp16 (what the store holds): a GPU gathers each batch itself instead of
    the CPU gathering it and copying it over, step after step. :func:`resident` decides when they fit."""

    def __init__(self, rows: np.ndarray | CachedRows, device: torch.device, chunk: int = 4096):
        parts = [torch.from_numpy(np.asarray(take_rows(rows, np.arange(i, min(i + chunk, len(rows)))), dtype=np.float16)).to(device)
                 for i in range(0, len(rows), chunk)]
        self.rows = torch.cat(parts) if parts else torch.empty((0,), dtype=torch.float16, device=device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.rows.shape)

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """float32 rows `indices`, on the rows' device."""
        return self.rows[torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.rows.device)].float()


Rows = np.ndarray | CachedRows | DeviceRows  # cached activations: in memory, read batch by batch, or on a GPU


def resident(views: list[Rows], device: devices.Device, share: float = 0.25) -> list[Rows]:
    """On a GPU, `views` copied there once when together they take at most `share` of its free memory (as
    fp16, as stored); else as they are. A pooled row of lite0 is 2.5 kB: 60,000 images take 150 MB."""
    if not device.accelerated or not views:
        return views
    size = sum(int(np.prod(v.shape)) * 2 for v in views)
    if size > share * (device.free_bytes or 0):
        return views
    return [DeviceRows(v, device.torch_device) for v in views]


def take_rows(source: Rows, indices: np.ndarray) -> np.ndarray:
    """float32 rows `indices` of an in-memory array or of lazily read cached rows."""
    if isinstance(source, DeviceRows):
        return source.gather(indices).cpu().numpy()
    rows = source.take(indices) if isinstance(source, CachedRows) else source[indices]
    return np.ascontiguousarray(rows, dtype=np.float32)


def _rows(source: Rows, indices: np.ndarray) -> torch.Tensor:
    """take_rows as a tensor (on the rows' device), channels-last for maps."""
    tensor = source.gather(indices) if isinstance(source, DeviceRows) else torch.from_numpy(take_rows(source, indices))
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def pooled_features(tail: Tail, rows: Rows, batch_size: int = 256) -> np.ndarray:
    """The pooled features the classifier reads (the tail's blocks as they are now), for cached rows."""
    tail.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            rows_here = _rows(rows, np.arange(start, min(start + batch_size, len(rows))))
            out.append(tail.features(move(rows_here, device_of(tail))).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, tail.model.num_features), np.float32)


def selection_record(validated: dict) -> dict:
    """`valid_*` metrics of the selection images (carved from the training data) renamed `select_*`:
    automatic choices (early stopping, the batch-size search) read these, never the reported `valid_*`."""
    return {"select_" + key.removeprefix("valid_"): value for key, value in validated.items()}


def _gather_views(views: list[Rows], indices: np.ndarray, chosen: np.ndarray) -> torch.Tensor:
    """One batch: image indices[k] taken from view chosen[k], read view by view (only this batch in RAM)."""
    parts = {}
    for v in np.unique(chosen):
        picked = indices[chosen == v]
        unique, inverse = np.unique(picked, return_inverse=True)  # a balanced draw may repeat an image
        rows = _rows(views[int(v)], unique)
        parts[int(v)] = rows[torch.from_numpy(inverse).to(rows.device)]
    sample = next(iter(parts.values()))
    batch = torch.empty((len(indices), *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
    for v, rows in parts.items():
        batch[torch.from_numpy(chosen == v).to(sample.device)] = rows
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch


def predict_cached(tail: nn.Module, inputs: Rows, batch_size: int = 256) -> torch.Tensor:
    """Logits of a tail on cached activations, in batches, without autograd."""
    tail.eval()
    forward = following(tail)
    with torch.inference_mode():
        parts = [
            forward(_rows(inputs, np.arange(start, min(start + batch_size, len(inputs)))))
            for start in range(0, len(inputs), batch_size)
        ]
    return torch.cat(parts) if parts else torch.empty(0)


def _sample_weights(plan: Plan, labels: np.ndarray, paths=None) -> torch.Tensor | None:
    """Per-image draw weights: class-balanced (--sampler balanced) and/or hard examples `upweight_factor`
    times as often (--upweight hard.csv from `visiontune hard-examples`); None = a plain permutation."""
    weights = balanced_sample_weights(labels) if plan.sampler == "balanced" else None
    if plan.upweight and paths is not None:
        hard = read_upweighted(plan.upweight)
        boost = torch.tensor([plan.upweight_factor if str(Path(p).resolve()) in hard else 1.0 for p in paths], dtype=torch.float64)
        weights = boost if weights is None else weights * boost
    return weights


def _freeze_batchnorm(modules) -> None:
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


def class_indices(targets: np.ndarray) -> np.ndarray:
    """Class index per row of a task's targets (multi-hot rows: the first tag), for weights and sampling."""
    targets = np.asarray(targets)
    return targets.astype(np.int64) if targets.ndim == 1 else targets.argmax(1).astype(np.int64)


def target_tensor(targets: np.ndarray) -> torch.Tensor:
    """Class indices as int64, multi-hot rows as float32 (what the task's losses expect)."""
    targets = np.asarray(targets)
    return torch.from_numpy(targets.astype(np.int64) if targets.ndim == 1 else targets.astype(np.float32))


@dataclass
class Unlabelled:
    """Cached activations of images without labels that a training method learns from.

    Each batch carries `ratio` of them per labelled item under `key` (the plain view) and `key + "_aug"`
    (one of the augmented views, or the plain one again when none is cached). `key` is ``u`` for an
    unlabelled folder (semi-supervised) and ``xt`` for target-domain images (domain adaptation)."""

    key: str
    views: list[Rows]  # plain view first, then augmented views
    ratio: int = 3


def _extra_batches(extra: Unlabelled, seed: int, epoch: int, steps: int, per_step: int) -> list[dict[str, torch.Tensor]]:
    """The epoch's batches of one unlabelled source: seeded permutations, cycled, one view drawn per item."""
    n = len(extra.views[0])
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_777_777 * (1 + len(extra.key)))
    needed = steps * per_step
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-needed // n))])[:needed]
    choice = torch.randint(1, max(2, len(extra.views)), (needed,), generator=generator) if len(extra.views) > 1 else torch.zeros(needed, dtype=torch.long)
    out = []
    for step in range(steps):
        rows = order[step * per_step : (step + 1) * per_step].numpy()
        out.append({
            extra.key: _gather_views(extra.views, rows, np.zeros(len(rows), dtype=np.int64)),
            f"{extra.key}_aug": _gather_views(extra.views, rows, choice[step * per_step : (step + 1) * per_step].numpy()),
        })
    return out


def init_output_layer(layer: nn.Linear, how: str, seed: int) -> None:
    """`--head-init`: zero (the default: every class equally likely at step 0), or xavier/kaiming uniform
    weights drawn from the run's seed (bias zero); bench/results/playbook.md has what each did."""
    nn.init.zeros_(layer.bias)
    if how == "zero":
        nn.init.zeros_(layer.weight)
        return
    generator = torch.Generator().manual_seed(seed)
    fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
    bound = (6.0 / (fan_in + fan_out)) ** 0.5 if how == "xavier" else (6.0 / fan_in) ** 0.5  # kaiming: ReLU gain
    with torch.no_grad():
        layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)


def cached_phase(
    tail: Tail, train_views: list[Rows], train_y: np.ndarray, valid_x: Rows, valid_y: np.ndarray, plan: Plan,
    name: str = "head", train_paths=None, task: Task | None = None, extras: list[Unlabelled] | None = None,
    fresh_classifier: bool = True, select: tuple[Rows, np.ndarray] | None = None, shared: bool = False,
) -> Phase:
    """The tail on cached activations; `*_y` are the task's targets (class indices, or multi-hot rows).

    The classifier starts at zero (uniform predictions): timm's init is scaled for its own features and
    starts a fresh head with huge logits, which measurably cost accuracy (digits: 0.894 vs 0.942 at the
    same epochs); `fresh_classifier=False` continues from the current one (a second phase). With `extras`
    (unlabelled or target-domain activations) an epoch is long enough for each extra source to be seen
    once, the labelled data cycling as often as that takes."""
    task = task or SingleLabel()
    classifier = tail.model.get_classifier()
    if fresh_classifier:
        init_output_layer(output_layer(classifier), plan.head_init, plan.seed)
    trained = tail.trainable_parameters()
    for p in trained:
        p.requires_grad_(True)
    ids = {id(p) for p in trained}
    names = {n for n, p in tail.model.named_parameters() if id(p) in ids}
    groups = param_groups(tail.model, plan.lr, plan.lr_mult, trainable=names)
    labels = class_indices(train_y)
    y, vy = target_tensor(train_y), target_tensor(valid_y)
    weights = _sample_weights(plan, labels, train_paths)
    device = devices.choose(plan.device) if plan.device != "cpu" else devices.CPU
    train_views = resident(train_views, device)  # on a GPU: gathered there, step after step
    if len(valid_x):
        valid_x = resident([valid_x], device)[0]

    extras = extras or []
    labelled_steps = max(1, -(-len(y) // plan.batch_size))
    steps = max([labelled_steps] + [-(-len(e.views[0]) // (e.ratio * plan.batch_size)) for e in extras])

    def batches(epoch: int, first_step: int):
        if not extras:
            order, generator = epoch_order(len(y), plan.seed, epoch, weights)
            choice = torch.randint(len(train_views), (len(y),), generator=generator)
            for start in range(first_step * plan.batch_size, len(y), plan.batch_size):
                batch = order[start : start + plan.batch_size]
                if shared:  # this rank's block of the global batch
                    batch = batch[distributed.block(len(batch))]
                yield {"x": _gather_views(train_views, batch.numpy(), choice[batch].numpy()), "y": y[batch]}
            return
        cycles = [epoch_order(len(y), plan.seed, epoch * 1000 + c, weights) for c in range(-(-steps // labelled_steps))]
        order = torch.cat([o for o, _ in cycles])
        choice = torch.cat([torch.randint(len(train_views), (len(y),), generator=g) for _, g in cycles])
        extra_batches = [_extra_batches(e, plan.seed, epoch, steps, e.ratio * plan.batch_size) for e in extras]
        for step in range(first_step, steps):
            cycle, start = divmod(step, labelled_steps)
            picked = order[cycle * len(y) + start * plan.batch_size : cycle * len(y) + min(len(y), (start + 1) * plan.batch_size)]
            rows = choice[cycle * len(y) + start * plan.batch_size : cycle * len(y) + min(len(y), (start + 1) * plan.batch_size)]
            batch = {"x": _gather_views(train_views, picked.numpy(), rows.numpy()), "y": y[picked]}
            for source in extra_batches:
                batch.update(source[step])
            yield batch

    def validate(m: nn.Module) -> dict:
        record = task.validate(predict_cached(m, valid_x), vy) if len(vy) else {}
        if select is not None:
            record.update(selection_record(task.validate(predict_cached(m, select[0]), target_tensor(select[1]))))
        return record

    def prepare_epoch(epoch: int) -> None:
        if plan.bn_freeze:
            _freeze_batchnorm([tail])

    def bn_batches():
        for start in range(0, len(y), 256):
            yield _rows(train_views[0], np.arange(start, min(start + 256, len(y))))

    return Phase(
        name=name, module=tail, groups=groups, epochs=plan.epochs, labels=labels,
        n_classes=classifier.out_features, task=task, batches=batches,
        validate=validate,
        prepare_epoch=prepare_epoch, batchnorms=lambda m: m.batchnorms() if not plan.bn_freeze else [],
        bn_batches=bn_batches, batch_size=plan.batch_size, steps=steps if extras else None,
        input_shape=tuple(train_views[0].shape[1:]), shared=shared,
    )


def train_cached(
    tail: Tail, train_views: list[Rows], train_y: np.ndarray, valid_x: Rows, valid_y: np.ndarray, plan: Plan,
    log: Log, phase: str = "head", checkpoints: Path | None = None, resume: Checkpoint | None = None,
    metrics_lines=lambda: 0, train_paths=None, task: Task | None = None, extras: list[Unlabelled] | None = None,
    fresh_classifier: bool = True, select: tuple[Rows, np.ndarray] | None = None, shared: bool = False,
) -> list[dict]:
    """Train a tail in place on cached activations (see :func:`cached_phase`)."""
    setup = cached_phase(tail, train_views, train_y, valid_x, valid_y, plan, phase, train_paths, task, extras,
                         fresh_classifier, select, shared)
    return run_phase(setup, plan, log, checkpoints, resume, metrics_lines)


def first_trained_group(model: nn.Module, plan: Plan) -> int:
    """Lowest layer group fine-tuning trains: from --freeze-to, else the top `unfreeze_groups` (-1 = all)."""
    n = len(layer_groups(model))
    if plan.freeze_to:
        return group_index(model, plan.freeze_to)
    return 0 if plan.unfreeze_groups < 0 else max(0, n - max(1, plan.unfreeze_groups))


def finetune_phase(
    model: nn.Module, train: Catalog, valid: Catalog, preprocessing: Preprocessing, plan: Plan,
    skipped: list[Skipped], workers: int = 1, task: Task | None = None, select: Catalog | None = None,
    shared: bool = False,
) -> Phase:
    """Fine-tune the layer groups from :func:`first_trained_group` up, on augmented images.

    Frozen groups keep their BatchNorm statistics (and with `plan.bn_freeze` every BatchNorm does). With
    `plan.gradual` the first epoch trains the top two groups and each further epoch one more (ULMFiT's
    gradual unfreezing), down to the first trained group.
    """
    task = task or SingleLabel()
    groups_names = layer_groups(model)
    first = first_trained_group(model, plan)
    trainable = {n for g in groups_names[first:] for n in g}
    named = dict(model.named_parameters())
    groups = param_groups(model, plan.finetune_lr, plan.lr_mult, trainable=trainable)
    modules = dict(model.named_modules())
    labels = np.asarray(train.labels, dtype=np.int64)
    weights = _sample_weights(plan, labels, train.paths)
    transform = augmentation(preprocessing, plan.aug)
    row_targets = torch.from_numpy(task.targets(train))
    seen_failures: set[str] = set()
    model.to(memory_format=torch.channels_last)
    on_gpu = devices.choose(plan.device).accelerated if plan.device != "cpu" else False
    workers = loader_workers(devices.choose(plan.device), workers) if on_gpu else workers

    def prepare_epoch(epoch: int) -> None:
        lowest = max(first, len(groups_names) - 2 - epoch) if plan.gradual else first
        for index, names in enumerate(groups_names):
            for n in names:
                named[n].requires_grad_(index >= lowest)
        frozen_modules = [
            m for name, m in modules.items()
            if name and not any(p.requires_grad for p in m.parameters(recurse=False)) and not list(m.children())
        ]
        _freeze_batchnorm(list(model.modules()) if plan.bn_freeze else frozen_modules)

    def batches(epoch: int, first_step: int):
        order, _ = epoch_order(len(labels), plan.seed, epoch, weights)
        base = (plan.seed * 1_000_003 + epoch) * 7919
        dataset = ImageFiles(
            train.paths, list(range(len(labels))), transform, preprocessing.input_size,
            seeds=[(base + i) % 2**62 for i in range(len(labels))],
        )  # items carry their row; the batch's targets are looked up below (class index or multi-hot row)
        rest, size = order[first_step * plan.batch_size :].tolist(), plan.batch_size
        if shared:  # this rank's block of every global batch: only its own images are decoded
            mine = distributed.block(plan.batch_size)
            rest, size = distributed.blocks_of_batches(rest, plan.batch_size), mine.stop - mine.start
        for batch in iterate_batches(dataset, size, workers=workers, order=rest, pin_memory=on_gpu and workers > 0):
            for _, path, reason in batch.failed:
                if path not in seen_failures:
                    seen_failures.add(path)
                    skipped.append(Skipped(path, reason))
            yield {"x": batch.images.contiguous(memory_format=torch.channels_last), "y": row_targets[batch.labels]}

    def bn_batches():
        plain = ImageFiles(train.paths, train.labels, eval_transform(preprocessing), preprocessing.input_size)
        for batch in iterate_batches(plain, plan.batch_size, workers=workers):
            yield batch.images.contiguous(memory_format=torch.channels_last)

    def validate_on(m: nn.Module, catalog: Catalog) -> dict:
        part = distributed.block(len(catalog.paths)) if shared else slice(None)
        kept, logits = collect_outputs(following(m), catalog.paths[part], preprocessing, plan.batch_size, workers, "validating")
        if shared:  # every rank predicted its block; all compute the same metrics from the whole
            blocks = distributed.gather((kept + part.start, logits))
            kept, logits = np.concatenate([k for k, _ in blocks]), np.concatenate([v for _, v in blocks])
        return task.validate(torch.from_numpy(logits), torch.from_numpy(task.targets(catalog)[kept]))

    def validate(m: nn.Module) -> dict:
        m.eval()
        record = validate_on(m, valid)
        if select is not None:
            record.update(selection_record(validate_on(m, select)))
        return record

    return Phase(
        name="finetune", module=model, groups=groups, epochs=plan.finetune_epochs, labels=labels,
        n_classes=model.get_classifier().out_features, task=task, batches=batches, validate=validate,
        prepare_epoch=prepare_epoch,
        batchnorms=lambda m: [] if plan.bn_freeze else [
            b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)
        ],
        bn_batches=bn_batches, batch_size=plan.batch_size, pct_start=0.2, shared=shared,
    )


def finetune(
    model: nn.Module, train: Catalog, valid: Catalog, preprocessing: Preprocessing, plan: Plan, log: Log,
    checkpoints: Path | None, skipped: list[Skipped], workers: int = 1, resume: Checkpoint | None = None,
    metrics_lines=lambda: 0, task: Task | None = None, select: Catalog | None = None, shared: bool = False,
) -> list[dict]:
    """Fine-tune in place (see :func:`finetune_phase`); every parameter trainable again afterwards."""
    setup = finetune_phase(model, train, valid, preprocessing, plan, skipped, workers, task, select, shared)
    try:
        return run_phase(setup, plan, log, checkpoints, resume, metrics_lines)
    finally:
        for param in model.parameters():
            param.requires_grad_(True)
