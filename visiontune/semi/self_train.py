"""Self-training (Yarowsky 1995; noisy student, Xie et al. 2020, without the larger student): retrain on the
labelled images plus the extra images the labelled-only model labels confidently. It adds no loss of its own
(it trains with the supervised objective), so it serves unlabelled images (`--ssl self-train`) and a target
domain (`--adapt self-train`: class-agnostic self-training on the target, CBST without the class balance)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from visiontune.backbones.cuts import Tail
from visiontune.train.extra_methods import Candidate, Extra, ExtraMethod, register_method, tail_probabilities
from visiontune.train.phases import take_rows, train_cached
from visiontune.train.plan import Plan


@register_method
class SelfTrain(ExtraMethod):
    name, kinds, order = "self-train", ("ssl", "adapt"), 80

    def train(self, tail: Tail, cand: Candidate, train_views, y_train, valid_x, y_valid, extra, task, log, **run):
        return self_train(tail, cand.plan, train_views, y_train, valid_x, y_valid, extra, task, log, **run)


def _concat_views(labelled: list, extra: list, rows: np.ndarray) -> list[np.ndarray]:
    """Training views of labelled images followed by the chosen extra images (their views cycled to match)."""
    count = max(len(labelled), len(extra))
    return [np.concatenate([np.asarray(labelled[v % len(labelled)], dtype=np.float32),
                            take_rows(extra[v % len(extra)], rows)]) for v in range(count)]


def self_train(tail: Tail, plan: Plan, train_views, y_train, valid_x, y_valid, extra: Extra, task, log,
               phase: str = "cached", checkpoints=None, resume=None, **run) -> list[dict]:
    """Self-training (Yarowsky 1995; noisy student, Xie et al. 2020, without the larger student): the
    labelled-only model labels the extra images; those it gives at least ``--threshold`` probability join
    the labelled ones, and the tail is trained again from its pretrained weights on both, with the
    default recipe (``--extra-epochs`` epochs) and the augmented cached views as noise. Retraining on a
    fixed, larger labelled set costs one forward and backward pass per image and epoch — about half of an
    online method's step (a second, weak forward per unlabelled image) — which buys more epochs on a CPU.
    For a target domain this is class-agnostic self-training on the target (CBST without the class
    balance). Resumable in either of its two phases."""
    warm_name, extra_name = f"{phase}:warm", f"{phase}:self-train"
    pretrained = copy.deepcopy(tail.model.state_dict())
    in_extra = resume is not None and resume.position.phase == extra_name
    supervised = replace(plan, objective="supervised")
    history: list[dict] = []
    if not in_extra:
        history += train_cached(tail, train_views, y_train, valid_x, y_valid, supervised, log, phase=warm_name,
                                checkpoints=checkpoints, resume=resume, task=task, **run)
    probs = tail_probabilities(tail, extra.views[0]) if not in_extra else None
    if in_extra:  # the warm model is gone: rebuild it to label the same images (deterministic)
        tail.model.load_state_dict(pretrained)
        train_cached(tail, train_views, y_train, valid_x, y_valid, supervised, lambda r: None, phase=warm_name, task=task)
        probs = tail_probabilities(tail, extra.views[0])
    confident = np.flatnonzero(probs.max(1) >= plan.threshold)
    pseudo = probs.argmax(1)[confident]
    log({"phase": extra_name, "kind": "pseudo-labels", "given": int(len(confident)), "of": int(len(probs)),
         "per_class": np.bincount(pseudo, minlength=probs.shape[1]).tolist()})
    tail.model.load_state_dict(pretrained)
    views = _concat_views(train_views, extra.views, confident)
    targets = np.concatenate([np.asarray(y_train), pseudo])
    history += train_cached(tail, views, targets, valid_x, y_valid, replace(supervised, epochs=plan.extra_epochs), log,
                            phase=extra_name, checkpoints=checkpoints, resume=resume if in_extra else None, task=task,
                            **{k: v for k, v in run.items() if k != "train_paths"})
    return history
