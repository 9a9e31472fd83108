"""Beyond the labelled folder: semi-supervised learning on unlabelled images and adaptation to a
target domain, wired into a training run (visiontune/pipeline/ calls this module).

* The unlabelled (``--unlabeled DIR``) or target (``--target DIR``) images are catalogued like any folder
  (recursive, bad files skipped with reasons) and cached at the plan's cut: the plain view plus
  ``--unlabeled-views`` augmented views (the ``strong`` preset). The cached phase then draws
  ``--unlabeled-ratio`` of them per labelled image into every batch (train/phases.py: Unlabelled).
* The method is an objective registered in semi/ or adapt/ (``--ssl``/``--adapt`` name it), or for TCA
  and JDA a closed-form projection of pooled features, folded into the classifier afterwards.
* ``auto`` trains every candidate and keeps the best by a criterion that reads no validation or target
  label: for semi-supervised methods, accuracy on an inner split carved from the labelled *training*
  images; for adaptation, MixVal's inter-cluster score (Hu et al. 2023) on target images held out of the
  trials: how often the candidate's model names the dominant image's own pseudo-label on mixes of two
  target images it labels differently
  (see :func:`mixval_inter` and :func:`choose_method`).
* ``--target-labels DIR`` (class folders of labelled target images) is read only after training, to
  evaluate on the target: per-class accuracy, and the feature-space picture of both domains for the report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from visiontune import device as devices
from visiontune import adapt, semi  # noqa: F401  (importing them registers the built-in methods)
from visiontune.backbones.cuts import Tail
from visiontune.cache.features import cached_activations
from visiontune.locations import cache_folder
from visiontune.data.catalog import Catalog, unlabelled_catalog
from visiontune.data.split import hold_out
from visiontune.errors import UsageError
from visiontune.evaluation.metrics import classification_metrics
from visiontune.progress import console
from visiontune.task.kinds import Task
from visiontune.train.extra_methods import SOURCE_ONLY, Candidate, Extra, methods_for, method_named, tail_probabilities
from visiontune.train.phases import predict_cached, take_rows
from visiontune.train.plan import Plan

UNLABELLED_AUG = "strong"  # augmented cached views of unlabelled/target images: FixMatch's "strong" side


def check_request(plan: Plan, unlabeled: str | None, target: str | None, task: Task) -> None:
    """Refuse combinations that cannot run, before anything is cached."""
    if plan.ssl and not unlabeled:
        raise UsageError(f"--ssl {plan.ssl} needs --unlabeled DIR (a folder of images without labels)")
    if plan.adapt and not target:
        raise UsageError(f"--adapt {plan.adapt} needs --target DIR (images of the domain to adapt to)")
    if unlabeled and target:
        raise UsageError("--unlabeled and --target together are not supported yet: run one of them")
    if (unlabeled or target) and not task.exclusive:
        raise UsageError("semi-supervised learning and domain adaptation are for single-label data")
    if (unlabeled or target) and plan.finetune_epochs > 0:
        raise UsageError("--unlabeled/--target train on cached activations: drop --unfreeze (fine-tuning on images)")
    for kind in ("ssl", "adapt"):
        name = getattr(plan, kind)
        if name and name != "auto" and name not in methods_for(kind):
            raise UsageError(f"--{kind} {name!r}: choose from {', '.join(methods_for(kind))} or auto")


def settle_plan(plan: Plan, unlabeled: str | None, target: str | None) -> Plan:
    """Defaults when unlabelled or target images are given, each with its reason: FixMatch for unlabelled
    images (the strongest of the classic methods in USB's benchmarks), auto for a target domain (which
    method helps depends on the shift). Returns the plan with them."""
    if unlabeled and not plan.ssl:
        plan = plan.chosen({"ssl": "unlabelled images given: FixMatch (confident weak-view pseudo-labels on strong views)"},
                           ssl="fixmatch")
    if target and not plan.adapt:
        plan = plan.chosen({"adapt": "target images given: every method tried, the best kept by MixVal on target images "
                                     "held out of the trials"}, adapt="auto")
    return plan


def cache_extra(key: str, folder: str, backbone, plan: Plan, cache_dir: str | None, workers: int) -> Extra:
    """Catalog and cache an unlabelled or target folder at the plan's cut."""
    what = "unlabelled" if key == "u" else "target"
    catalog = unlabelled_catalog(folder, what)
    root = cache_folder(cache_dir)
    common = {"cut": plan.cut, "seed": plan.seed, "batch_size": plan.batch_size, "workers": workers, "engine": plan.engine,
              "device": devices.choose(plan.device)}
    kept, plain, skipped = cached_activations(backbone, catalog.paths, root, description=what, **common)
    views = [plain]
    for view in range(plan.unlabeled_views):
        kept_v, rows, _ = cached_activations(backbone, catalog.paths, root, view=view, description=what, aug=UNLABELLED_AUG, **common)
        views.append(rows[np.isin(kept_v, kept)])
    catalog = catalog.subset([int(i) for i in kept])
    console.print(f"{what}: {len(catalog)} images ({len(catalog.skipped) + len(skipped)} skipped), {len(views)} cached views")
    return Extra(key, catalog, views, list(catalog.skipped) + skipped)


def candidate(method: str, plan: Plan, tail: Tail, train_rows, y_train: np.ndarray, extra: Extra | None) -> Candidate:
    """Method `method` (a registered name; "none", "" or "supervised": the labelled images alone) ready to
    train: what it fits in closed form, and the plan with its objective."""
    return method_named(method).fit(plan, tail, train_rows, y_train, extra)


def train_candidate(
    tail: Tail, cand: Candidate, train_views: list, y_train: np.ndarray, valid_x, y_valid: np.ndarray,
    extra: Extra | None, task, log, **run,
) -> list[dict]:
    """Train the tail in place with the candidate's method (its :meth:`ExtraMethod.train`)."""
    return method_named(cand.method).train(tail, cand, train_views, y_train, valid_x, y_valid, extra, task, log, **run)


#: Below this many held-out target images `--adapt auto` warns that its choice is close to arbitrary.
FEW_HELD_OUT = 20


def mixval_inter(probabilities: Callable[[np.ndarray], np.ndarray], target_rows: np.ndarray, seed: int,
                 pairings: int = 10, mix: float = 0.55, own: np.ndarray | None = None) -> float:
    """MixVal's inter-cluster score (Hu et al., NeurIPS 2023; higher is better), on the cached activations the
    candidate's model reads: each unlabelled target image is mixed 0.55 : 0.45 with a partner its model labels
    differently, and the score is how often the model still names the dominant image's own pseudo-label.
    A model whose target classes are compact clusters with the boundary between them keeps that label; one
    that drew its boundaries through the target's clusters (or sharpened a wrong labelling) flips it. Reads
    only the model's outputs on target images.

    0.55 is the paper's mix (just past half, to probe the boundary). The paper pairs each batch with its own
    reversal once; one pairing of 2,000 images left two methods 2.5 points apart on the bench swapping places
    with the pairing (score sd ~0.009 between pairings), so the score is averaged over `pairings` random
    pairings (standard error ~0.003). A model that gives every target image one class has no inter-cluster
    pair and scores 0. `own`: the model's labels of `target_rows`, when the caller has them already."""
    rows = np.asarray(target_rows, dtype=np.float32)
    own = probabilities(rows).argmax(1) if own is None else own
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    for _ in range(pairings):
        partner = rng.permutation(len(rows))
        differ = own != own[partner]
        if differ.any():
            mixed = mix * rows[differ] + (1 - mix) * rows[partner[differ]]
            kept.append(probabilities(mixed).argmax(1) == own[differ])
    return float(np.concatenate(kept).mean()) if kept else 0.0


def choose_method(
    kind: str, tail: Tail, plan: Plan, train_views: list, y_train: np.ndarray, extra: Extra, task,
) -> tuple[str, dict]:
    """`--ssl auto` / `--adapt auto`: train each candidate on an inner split of the labelled training images
    and keep the best by a criterion that reads no validation or target label.

    SSL: accuracy on the inner 20 % (the same distribution as the data the run reports on). Adaptation:
    MixVal's inter-cluster score (:func:`mixval_inter`) on 20 % of the target images held out of every
    trial: self-training fits its own pseudo-labels of the images it adapts to, so scored on those it looks
    as consistent as its labelling is confident (on a first build of the digits -> photo-blended digits
    check it was picked while 10 points below source-only). Two criteria tried before it (2026-11-26, no
    longer computed): deep embedded validation (You et al. 2019) with truncated, self-normalised weights and
    information maximisation of the target predictions. Both picked DANN on the bench, 3 points below the
    best: DEV favours methods whose own features make the domains indistinguishable, and models trained to
    near-zero loss are all confident, so IM hardly separates them. The trials draw no random number the run's own training would draw (numpy
    generators seeded by the plan for the mixes), so auto -> X trains the same model as asking for X."""
    methods = methods_for(kind)
    inner_train, inner_valid = hold_out(y_train, 0.2, plan.seed + 17)  # the SSL criterion's inner 20 %
    views_tr = [take_rows(v, inner_train) for v in train_views]
    x_iv, y_iv = take_rows(train_views[0], inner_valid), y_train[inner_valid]
    trial_extra, target_rows = extra, None
    if kind != "ssl":  # the target images the criterion reads are held out of every trial's training
        target_in, target_out = hold_out(len(extra.views[0]), 0.2, plan.seed + 29)
        trial_extra = replace(extra, views=[take_rows(v, target_in) for v in extra.views])
        target_rows = take_rows(extra.views[0], target_out[:2000])
        if len(target_out) < FEW_HELD_OUT:
            console.print(f"[yellow]auto adapt: only {len(target_out)} target images to score the methods on (20 % of "
                          f"{len(extra.views[0])}): the choice is close to arbitrary; add target images or name a method[/]")
    saved = copy.deepcopy(tail.model.state_dict())
    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    with torch.random.fork_rng():
        for method in methods:
            try:
                cand = candidate(method, replace(plan, checkpoint_every=0, eval_every=0, early_stop=0), tail, views_tr[0],
                                 y_train[inner_train], trial_extra)
            except UsageError as exc:  # a method these images cannot support (coral-cut on one target image)
                skipped[method] = str(exc)
                console.print(f"auto {kind}: {method} skipped: {exc}")
                continue
            train_candidate(tail, cand, views_tr, y_train[inner_train], x_iv, y_iv, trial_extra, task, lambda r: None,
                            phase=f"auto:{method}")
            if kind == "ssl":
                probs = task.activation(predict_cached(tail, x_iv)).numpy()
                scores[method] = float((probs.argmax(1) == y_iv).mean())
            else:
                scores[method] = mixval_inter(lambda rows: tail_probabilities(tail, rows), target_rows, plan.seed)
            tail.model.load_state_dict(saved)
            console.print(f"auto {kind}: {method} -> {scores[method]:.4f}")
    best = max(scores, key=scores.get)
    criterion = ("accuracy on an inner 20 % of the labelled training images" if kind == "ssl"
                 else "MixVal inter-cluster score on 20 % of the unlabelled target images, held out of every trial "
                      "(mixes 0.55 : 0.45 of two images "
                      "labelled differently that keep the dominant one's label, 10 pairings; higher is better), "
                      "each method trained on an inner 80 % of the source training images")
    logged = {"held_out_target_images": len(target_out)} if kind != "ssl" else {}
    return best, {"criterion": criterion, "scores": scores, "chosen": best, **logged,
                  **({"skipped": skipped} if skipped else {})}


#: A method this far below the source-only yardstick (accuracy, as a fraction) is flagged in console and report.
WORSE_THAN_SOURCE_ONLY = 0.01


@dataclass
class SourceOnlyYardstick:
    """The labelled-target metrics the same run would have had without adapting. Taken before the method trains
    (the tail's weights and the random state its training starts from); :meth:`score` then resets the tail to
    those weights, trains it on the source alone from that random state (so exactly as `--adapt none` would,
    in a forked random state, no checkpoints), evaluates, and puts the adapted weights back. A method that
    loses to doing nothing then says so (:data:`WORSE_THAN_SOURCE_ONLY`) in the run's own output and report,
    not only in a benchmark table."""

    initial: dict
    rng_state: torch.Tensor

    @classmethod
    def before_training(cls, tail: Tail) -> SourceOnlyYardstick:
        return cls(copy.deepcopy(tail.model.state_dict()), torch.get_rng_state())

    def score(self, tail: Tail, plan: Plan, train_views: list, y_train: np.ndarray, valid_x, y_valid: np.ndarray, task,
              evaluate: Callable[[], dict]) -> dict:
        adapted = copy.deepcopy(tail.model.state_dict())
        tail.model.load_state_dict(self.initial)
        try:
            with torch.random.fork_rng():
                torch.set_rng_state(self.rng_state)
                none = candidate(SOURCE_ONLY, plan, tail, train_views[0], y_train, None)
                train_candidate(tail, none, train_views, y_train, valid_x, y_valid, None, task, lambda record: None,
                                phase="reference:source-only")
                return evaluate()
        finally:
            tail.model.load_state_dict(adapted)


def evaluate_target(tail: Tail, catalog: Catalog, backbone, plan: Plan, classes: list[str], cache_dir, workers) -> dict:
    """Metrics of the trained tail on labelled target images (read only now, after training)."""
    root = cache_folder(cache_dir)
    kept, rows, _ = cached_activations(backbone, catalog.paths, root, cut=plan.cut, seed=plan.seed,
                                       batch_size=plan.batch_size, workers=workers, engine=plan.engine,
                                       description="target evaluation", device=devices.choose(plan.device))
    return classification_metrics(np.asarray(catalog.labels)[kept], tail_probabilities(tail, rows), classes)


def domain_picture(source: np.ndarray, target: np.ndarray, seed: int = 0, points: int = 300) -> dict:
    """Proxy A-distance (Ben-David et al.) from a linear domain classifier's held-out error, and a 2-D PCA
    of a sample of both domains: how far apart the domains are in a feature space."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(seed)
    s = source[rng.choice(len(source), min(len(source), 1000), replace=False)]
    t = target[rng.choice(len(target), min(len(target), 1000), replace=False)]
    x = np.vstack([s, t])
    d = np.r_[np.zeros(len(s)), np.ones(len(t))]
    accuracy = cross_val_score(LogisticRegression(max_iter=1000), x, d, cv=3).mean()
    error = 1.0 - accuracy
    pca = PCA(2, random_state=seed).fit(x)
    return {
        "proxy_a_distance": float(2 * (1 - 2 * min(error, 0.5))),
        "domain_classifier_accuracy": float(accuracy),
        "mean_shift": float(np.linalg.norm(s.mean(0) - t.mean(0)) / (np.linalg.norm(s.std(0)) + 1e-12)),
        "scatter": {"source": pca.transform(s[:points]).round(3).tolist(), "target": pca.transform(t[:points]).round(3).tolist()},
    }
