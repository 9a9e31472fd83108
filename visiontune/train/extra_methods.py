"""The one interface of every method that learns from images beyond the labelled ones: unlabelled images
(`--ssl`, kind "ssl") or another domain's (`--adapt`, kind "adapt").

A method is one :class:`ExtraMethod` registered by name with :func:`register_method`, in the file that holds
its math (semi/, adapt/). It says which kinds it serves, which training objective it trains with (an
:class:`~visiontune.train.objectives.Objective` registered by the same or another name; "supervised" when it
adds no loss of its own), what it fits in closed form before training (:meth:`ExtraMethod.fit`: a projection,
a re-colouring) and how it trains (:meth:`ExtraMethod.train`: by default a labelled-only warm start, then
passes over the extra images with its objective). `--ssl/--adapt` choices and the `auto` trials come from
this registry (:func:`methods_for`), in each method's declared `order`; nothing else compares method names.

    from visiontune.train.extra_methods import ExtraMethod, register_method

    @register_method
    class MyMethod(ExtraMethod):
        name, kinds, objective, order = "my-method", ("ssl",), "my-objective", 50
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from visiontune.backbones.cuts import Tail
from visiontune.data.catalog import Catalog, Skipped
from visiontune.errors import UsageError
from visiontune.train.phases import Unlabelled, pooled_features, predict_cached, train_cached
from visiontune.train.plan import Plan

#: The method that trains on the labelled (source) images alone: `--adapt none`, and the yardstick's model.
SOURCE_ONLY = "none"
KINDS = {"ssl": "--ssl (unlabelled images, --unlabeled DIR)", "adapt": "--adapt (a target domain's images, --target DIR)"}


@dataclass
class Extra:
    """The unlabelled or target images of a run, cached."""

    key: str  # "u" (semi-supervised) or "xt" (target domain)
    catalog: Catalog
    views: list  # cached rows: plain view first
    skipped: list[Skipped] = field(default_factory=list)

    def unlabelled(self, plan: Plan) -> Unlabelled:
        return Unlabelled(self.key, self.views, plan.unlabeled_ratio)


@dataclass
class Candidate:
    """One method ready to train: its name, the plan it trains with (its objective set), and what it fitted
    in closed form — for TCA/JDA a projection of pooled features, for coral-cut a re-colouring of the source
    activations."""

    method: str
    plan: Plan
    projection: object | None = None
    recolour: object | None = None

    def source_rows(self, rows):
        """Source activations as this method trains on them (re-coloured for coral-cut, else as cached)."""
        return self.recolour(rows) if self.recolour is not None else rows

    def features_seen(self, tail: Tail, source_rows, target_rows) -> tuple[np.ndarray, np.ndarray]:
        """Source and target as the trained classifier's linear layer reads them: the tail's pooled features
        of the source as trained on (re-coloured for coral-cut), projected for TCA/JDA."""
        source, target = pooled_features(tail, self.source_rows(source_rows)), pooled_features(tail, target_rows)
        return (self.projection(source), self.projection(target)) if self.projection is not None else (source, target)


class ExtraMethod:
    """Base of a method that learns from extra images. Subclasses set the class attributes and override
    :meth:`fit` and/or :meth:`train` where they differ from an objective trained after a warm start."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # "ssl", "adapt" or both
    objective: ClassVar[str] = "supervised"  # the Objective it trains with ("supervised": no loss of its own)
    order: ClassVar[float] = 100.0  # place in the choices and the auto trials (auto keeps the earlier on a tie)
    baseline: ClassVar[bool] = False  # trains on the labelled images alone (the yardstick has nothing to compare)

    def fit(self, plan: Plan, tail: Tail, train_rows, y_train: np.ndarray, extra: Extra | None) -> Candidate:
        """What the method fits before training (on the pooled features or activations of the pretrained
        tail); raise UsageError when the images cannot support it (auto then skips it)."""
        return Candidate(self.name, replace(plan, objective=self.objective))

    def train(self, tail: Tail, cand: Candidate, train_views: list, y_train: np.ndarray, valid_x, y_valid: np.ndarray,
              extra: Extra | None, task, log, **run) -> list[dict]:
        """Train the tail in place (the phase's loop, callbacks and checkpoints as usual). Extra images enter
        the batches only for a method with an objective of its own, after a labelled warm start."""
        if extra is not None and cand.plan.objective != "supervised":
            return warm_then_extra(tail, cand.plan, train_views, y_train, valid_x, y_valid, [extra.unlabelled(cand.plan)],
                                   task, log, **run)
        return train_cached(tail, train_views, y_train, valid_x, y_valid, cand.plan, log, task=task, **run)


#: Every method by name, as registered: importing semi/ and adapt/ registers the built-in ones (beyond.py
#: imports both; this module sits below them and never imports them).
EXTRA_METHODS: dict[str, ExtraMethod] = {}


def register_method(cls: type[ExtraMethod]) -> type[ExtraMethod]:
    """Class decorator: make a method available to `--ssl`/`--adapt` (per its kinds) and to their `auto`."""
    unknown = set(cls.kinds) - set(KINDS)
    if unknown or not cls.kinds:
        raise ValueError(f"{cls.__name__}: kinds must be among {', '.join(KINDS)}")
    EXTRA_METHODS[cls.name] = cls()
    return cls


def methods_for(kind: str) -> tuple[str, ...]:
    """The names `--ssl` (kind "ssl") or `--adapt` ("adapt") accepts besides auto, in trial order."""
    found = [m for m in EXTRA_METHODS.values() if kind in m.kinds]
    return tuple(m.name for m in sorted(found, key=lambda m: m.order))


def method_named(name: str, kind: str | None = None) -> ExtraMethod:
    """The registered method `name` ("" and "supervised" mean none); a name it does not know is refused with
    the choices."""
    name = SOURCE_ONLY if name in ("", "supervised") else name
    if name not in EXTRA_METHODS or (kind is not None and kind not in EXTRA_METHODS[name].kinds):
        kinds = [kind] if kind else list(KINDS)
        raise UsageError(f"unknown method {name!r}; " + "; ".join(
            f"{KINDS[k].split(' ')[0]} takes {', '.join(methods_for(k))} or auto" for k in kinds))
    return EXTRA_METHODS[name]


@register_method
class SourceOnly(ExtraMethod):
    """`--adapt none`: train on the labelled source images alone (the yardstick every adaptation must beat)."""

    name, kinds, order, baseline = SOURCE_ONLY, ("adapt",), 90, True


def tail_probabilities(tail: Tail, rows) -> np.ndarray:
    """Softmax probabilities of the tail on cached rows (the methods here are for single-label data)."""
    return predict_cached(tail, rows).float().softmax(-1).numpy()


def warm_then_extra(tail: Tail, plan: Plan, train_views, y_train, valid_x, y_valid, extras, task, log,
                    phase: str = "cached", checkpoints=None, resume=None, **run) -> list[dict]:
    """A labelled-only warm start (the default recipe), then ``extra_epochs`` passes over the extra images
    with the method's objective from there. Starting from a model that already predicts well makes the
    first pseudo-labels and feature statistics useful at once, so a few passes over the unlabelled images
    do what many would from scratch (the cost that matters on a CPU). The second phase uses a cosine
    schedule from half the peak rate, since it refines a trained model. Resumable in either phase."""
    warm_name, extra_name = f"{phase}:warm", f"{phase}:{plan.objective}"
    history: list[dict] = []
    in_extra = resume is not None and resume.position.phase == extra_name
    if not in_extra:
        history += train_cached(tail, train_views, y_train, valid_x, y_valid, replace(plan, objective="supervised"), log,
                                phase=warm_name, checkpoints=checkpoints, resume=resume, task=task, **run)
    second = replace(plan, epochs=plan.extra_epochs, lr=plan.lr / 2, schedule="cosine", warmup_epochs=0.0)
    history += train_cached(tail, train_views, y_train, valid_x, y_valid, second, log, phase=extra_name,
                            checkpoints=checkpoints, resume=resume if in_extra else None, task=task, extras=extras,
                            fresh_classifier=False, **run)
    return history


def register_objective_method(name: str, kinds: tuple[str, ...], order: float) -> None:
    """Register the objective registered as `name` as a method of `kinds`: it trains with that objective's
    loss after a labelled warm start (the :class:`ExtraMethod` defaults)."""
    title = "".join(part.title() for part in name.split("-")) + "Method"
    register_method(type(title, (ExtraMethod,), {"name": name, "kinds": kinds, "objective": name, "order": order,
                                                 "__doc__": f"--{kinds[0]} {name}: the {name!r} objective."}))
