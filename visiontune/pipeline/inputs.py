"""The run's inputs: trunk activations of every image cached (or read), and leakage reported."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visiontune import distributed
from visiontune.cache.features import cached_activations, cached_thumbnails
from visiontune.cache.store import CachedRows
from visiontune.data.catalog import Skipped
from visiontune.data.leakage import Leakage, exact_leakage, near_leakage
from visiontune.locations import cache_folder
from visiontune.pipeline.prepare import Prepared
from visiontune.progress import console
from visiontune.runs import RunConfig, RunDir


@dataclass
class CachedInputs:
    """Trunk activations at the plan's cut: the training views (plain + augmented) and validation."""

    train_views: list[CachedRows]
    valid: CachedRows
    skipped: list[Skipped]


def report_leakage(prep: Prepared, config: RunConfig, run: RunDir) -> Leakage:
    """The same image in two classes, or on both sides of the split (byte-identical or near): printed as
    warnings and kept in `leakage.json`, so a run's numbers say what they may be inflated by."""
    found = exact_leakage(prep.train.paths, prep.train.labels, prep.valid.paths, prep.valid.labels, list(prep.source.classes))
    cache_root = cache_folder(config.cache_dir)
    found = near_leakage(found, cached_thumbnails(prep.train.paths, cache_root, "train"), prep.train.paths,
                         cached_thumbnails(prep.valid.paths, cache_root, "valid"), prep.valid.paths, seed=prep.plan.seed)
    run.write_json("leakage.json", found.to_dict())
    for line in found.lines():
        console.print(f"[yellow]{line}[/]")
    return found


def cache_inputs(prep: Prepared, config: RunConfig) -> CachedInputs:
    """Cache (or read) the activations of every image; drops the files that fail from the catalogs. In a
    distributed run the ranks share the work (cache/features.py)."""
    plan, backbone = prep.plan, prep.backbone
    cache_root = cache_folder(config.cache_dir)
    common = {"cut": plan.cut, "seed": plan.seed, "batch_size": plan.batch_size, "workers": config.workers,
              "engine": plan.engine, "shared": distributed.active(), "device": prep.device}
    skipped: list[Skipped] = []
    kept_va, x_va, bad = cached_activations(backbone, prep.valid.paths, cache_root, description="valid", **common)
    skipped += bad
    views = []
    kept_tr = None
    for view in [None, *range(plan.views)]:
        kept, x, bad = cached_activations(
            backbone, prep.train.paths, cache_root, view=view, description="train", aug=plan.aug, **common
        )
        if view is None:
            skipped += bad
            kept_tr = kept
        views.append(x[np.isin(kept, kept_tr)])
    prep.train = prep.train.subset([int(i) for i in kept_tr])
    prep.valid = prep.valid.subset([int(i) for i in kept_va])
    return CachedInputs(views, x_va, skipped)
