"""Before training: the data catalogued and split, the task, the backbone, the measured profiles, and the
plan with its reasons and predicted time (:func:`prepare`)."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch

from visiontune import beyond, distributed
from visiontune import device as devices
from visiontune.backbones.cuts import cut_points
from visiontune.backbones.registry import Backbone, create_backbone, resolve_arch
from visiontune.cache.features import trunk_engine_path, uncached_count
from visiontune.clock import seconds_since_process_start
from visiontune.data.catalog import Catalog, DataError, Source, discover
from visiontune.data.checked import recorded_in
from visiontune.data.split import kfold_indices, split_catalog
from visiontune.inference.engines import default_engine
from visiontune.device import Device
from visiontune.locations import cache_folder
from visiontune.runs import RunConfig
from visiontune.task.kinds import Task, task_for
from visiontune.train.plan import (
    Candidate, Plan, caching_seconds, choose_img_size, epoch_seconds, finetune_seconds, make_plan, parse_duration,
)
from visiontune.train.profile import DataProfile, SpeedProfile, profile_data, profile_speed


FINAL_OVERHEAD_S = 2.0  # final metrics and saving the classifier, measured ~1-2 s here
REPORT_S = 4.0  # building report.html: 3.7 s measured on the Fashion-MNIST bench (2,000 validation images)


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on CPU: python, numpy and torch generators, deterministic kernels; and
    subnormal floats flushed to zero.

    Subnormals (the gradients and Adam statistics of a loss near 0 on easy data) cost x86 CPUs ~100x: an epoch
    went from 4 s to 55 s on a separable 2-class folder. Set when a run starts (not when the module is imported),
    before torch starts its worker threads, which inherit the mode; the loop sets it again on its own thread
    (onnxruntime resets it)."""
    torch.set_flush_denormal(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)  # on a GPU, device.configure decides afterwards


@dataclass
class Prepared:
    """Everything decided before training: data, split, task, backbone, measured profiles and the plan."""

    source: Source
    train: Catalog
    valid: Catalog
    task: Task
    backbone: Backbone
    data_profile: DataProfile
    speed: SpeedProfile | None
    plan: Plan
    predicted: dict[str, float]  # predicted seconds of each part of the run (printed before training)
    device: Device = devices.CPU  # where the run computes (the plan's `device`, resolved once)


def concat(a: Catalog, b: Catalog) -> Catalog:
    tags = a.tags + b.tags if a.tags is not None and b.tags is not None else None
    return Catalog(a.paths + b.paths, a.labels + b.labels, a.classes, a.skipped + b.skipped, tags=tags)


def prepare(config: RunConfig, fold: tuple[int, int] | None = None, reserve_s: float = 0.0) -> Prepared:
    """Catalog and split the data (or take fold `fold` = (k, K) of a K-fold), choose the task, load the
    backbone, measure the data (and speed) and choose the plan; a budget keeps `reserve_s` seconds for
    the work after training (the report)."""
    seed_everything(config.seed)
    arch = resolve_arch(config.arch)  # typos in the name or the budget fail before any folder is scanned
    budget_s = parse_duration(config.budget)
    overrides = {**config.overrides, **{k: None for k in config.auto}}
    with recorded_in(cache_folder(config.cache_dir)):  # the header-check record lives with --cache-dir's features
        source = discover(config.data, labels=config.labels)
    if fold is not None:
        everything = source.train if source.valid is None else concat(source.train, source.valid)
        train_idx, valid_idx = kfold_indices(everything.labels, fold[1], fold[0], config.seed)
        train_cat, valid_cat = everything.subset(train_idx), everything.subset(valid_idx)
    elif source.valid is None:
        train_cat, valid_cat = split_catalog(source.train, overrides.get("valid_fraction") or 0.2, config.seed)
        if len(valid_cat) == 0:
            raise DataError(f"{config.data}: too few images to hold any out for validation; add images per class.")
    else:
        train_cat, valid_cat = source.train, source.valid
    task = task_for(train_cat)
    backbone = create_backbone(arch, config.weights, num_classes=len(source.classes))
    native = backbone.preprocessing.input_size
    data_profile = profile_data(backbone, train_cat, len(valid_cat))
    size = overrides.get("img_size") or choose_img_size(data_profile, native)[0]
    backbone.preprocessing = backbone.preprocessing.with_size(size)
    cuts = cut_points(backbone.model)
    device, device_choices = choose_device(overrides)
    engine = device_choices.get("engine") or overrides.get("engine") or default_engine()
    speed = profile_speed(backbone, train_cat, cuts[:4], engine, device=device) if budget_s is not None else None
    overrides = {**overrides, "seed": config.seed, "task": task.name}
    cache_root = cache_folder(config.cache_dir)

    @functools.cache
    def missing(cut: str, view: int | None, part: str) -> int:  # one index read per feature key, not per candidate
        paths = valid_cat.paths if part == "valid" else train_cat.paths
        return uncached_count(backbone, paths, cache_root, cut=cut, view=view, seed=config.seed, engine=engine,
                              aug=overrides.get("aug") or "light", device=device)

    def uncached(candidate: Candidate) -> int:
        """Trunk passes `candidate` still needs: the views of each image no cache shard holds yet."""
        return missing(candidate.cut, None, "valid") + sum(
            missing(candidate.cut, view, "train") for view in [None, *range(candidate.views)])

    plan = make_plan(data_profile, native, cuts, overrides, budget_s, speed, seconds_since_process_start() + reserve_s,
                     uncached, exclusive=task.exclusive, finetune_in_budget=device.accelerated)
    plan = plan.chosen(device_choices.pop("why"), **device_choices)
    if speed is None:  # time this plan's parts once, so the run can say how long it will take
        timed_cuts = sorted({plan.cut, cuts[0]} if plan.finetune_epochs else {plan.cut})
        to_cache = uncached(Candidate(plan.cut, plan.views, plan.epochs))
        paths = {plan.cut: trunk_engine_path(backbone, cache_root, plan.cut, plan.engine, plan.seed, device)} if to_cache else {}
        with torch.random.fork_rng():  # timing train steps must not move the run's random numbers
            speed = profile_speed(backbone, train_cat, timed_cuts, plan.engine, batch=plan.batch_size, engine_paths=paths,
                                  device=device)
    predicted = predict_parts(plan, data_profile, speed, uncached, reserve_s)
    if plan.budget_s is None:
        plan = plan.chosen({"predicted_s": "timed batches of this data on this machine (caching, epochs, fine-tuning, "
                                           "report)"}, predicted_s=round(sum(predicted.values()), 1))
    beyond.check_request(plan, config.unlabeled, config.target, task)
    plan = beyond.settle_plan(plan, config.unlabeled, config.target).chosen({"task": task.why})
    return Prepared(source, train_cat, valid_cat, task, backbone, data_profile, speed, plan, predicted, device)


def choose_device(overrides: dict) -> tuple[Device, dict]:
    """The run's device (--device, auto by default; in a job of several processes each one's own GPU), its
    kernels' determinism set, and the plan settings that follow from it, with their reasons (under "why"):
    the device with its name and memory; on a GPU mixed precision and the trunk pass in torch there."""
    here = distributed.world()
    device = devices.choose(overrides.get("device") or "auto", here.local_rank if here.shared else None)
    devices.bind_process(device)
    reproducible = devices.configure(device, bool(overrides.get("deterministic")))
    why = {"device": f"{device.describe()}: {device.why}", "deterministic": reproducible}
    changes: dict = {"device": device.spec, "why": why}
    if overrides.get("amp") is None:
        changes["amp"], why["amp"] = devices.mixed_by_default(device)
    if device.accelerated and not overrides.get("engine"):
        mixed = changes.get("amp", overrides.get("amp"))
        changes["engine"] = "torch-bf16" if mixed else "torch"
        why["engine"] = (f"on {device.spec} the trunk runs in torch there"
                         + (" under autocast (bf16 where the GPU has it, else fp16)" if mixed else " in fp32")
                         + "; onnxruntime is the CPU's engine")
    return device, changes


def predict_parts(plan: Plan, data: DataProfile, speed: SpeedProfile, uncached, reserve_s: float) -> dict[str, float]:
    """Predicted seconds of each part of the run, from the speed profile and what the cache already holds."""
    candidate = Candidate(plan.cut, plan.views, plan.epochs)
    passes = uncached(candidate)
    return {"so far": seconds_since_process_start(), f"caching {passes:,} image views": caching_seconds(candidate, passes, speed),
            f"{plan.epochs} epochs on cached activations": plan.epochs * epoch_seconds(plan.cut, data, speed),
            f"{plan.finetune_epochs} fine-tuning epochs": finetune_seconds(plan.finetune_epochs, data, speed),
            "evaluation, saving and the report": FINAL_OVERHEAD_S + reserve_s}


def predicted_text(predicted: dict[str, float]) -> str:
    """'predicted time 1:18 from the start (caching 1,968 image views 0:13, 10 epochs ... 0:51, ...)': the parts that take time."""
    from visiontune.progress import clock_text

    parts = ", ".join(f"{name} {clock_text(seconds)}" for name, seconds in predicted.items()
                      if name != "so far" and seconds >= 0.5)
    return f"predicted time {clock_text(sum(predicted.values()))} from the start ({parts})"
