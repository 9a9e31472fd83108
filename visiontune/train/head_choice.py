"""The classifier head of a run: fitted in closed form (`logreg`, `svm`), or chosen by `--head auto`.

`auto` (small single-label data) trains the plan's tail on the training images minus a carved selection
set, fits the cross-validated logistic regression on the same images' pooled features, and keeps the
probe only when it scores clearly better on the selection images — never on the reported validation
images. The same trial chooses the logit adjustment of imbalanced data (train/balance.py). The trial
models are thrown away: the chosen head is then trained on every training image.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch

from visiontune.backbones.cuts import Tail
from visiontune.backbones.heads import output_layer
from visiontune.train.callbacks import TRIAL
from visiontune.train.balance import adjusted, best_tau
from visiontune.train.phases import Rows, pooled_features, predict_cached, train_cached
from visiontune.train.plan import Plan
from visiontune.train.probe import FITS, LinearFit

AUTO_CANDIDATES = ("linear", "logreg")


def fit_closed_form_head(tail: Tail, plan: Plan, train_rows: Rows, y_train: np.ndarray) -> LinearFit:
    """Fit `plan.head` (logreg | svm) on the pooled features of the pretrained tail and write it into the
    model's classifier layer: the blocks stay as pretrained, the network predicts exactly like the fit."""
    classifier = output_layer(tail.model.get_classifier())
    fit = FITS[plan.head](pooled_features(tail, train_rows), np.asarray(y_train), classifier.out_features, plan.seed)
    fit.install(classifier)
    return fit


def score(logits: np.ndarray, y: np.ndarray, balanced: bool) -> tuple[float, float]:
    """(accuracy or balanced accuracy, log loss) of logits on labelled rows: what `auto` compares."""
    from sklearn.metrics import balanced_accuracy_score

    predicted = logits.argmax(1)
    accuracy = float(balanced_accuracy_score(y, predicted)) if balanced else float((predicted == y).mean())
    log_probs = torch.from_numpy(logits).float().log_softmax(-1).numpy()
    return accuracy, float(-log_probs[np.arange(len(y)), y].mean())


def choose_head(tail: Tail, plan: Plan, train_views: list[Rows], y_fit: np.ndarray, held_rows: Rows,
                y_held: np.ndarray, task, candidates: tuple[str, ...] = AUTO_CANDIDATES,
                prior: np.ndarray | None = None) -> tuple[str, float | None, dict]:
    """Train each candidate head on the fit images, score it on the held-out selection images; restore the
    model afterwards. With a class `prior` (imbalanced data) each candidate's logits are first shifted by the
    logit adjustment that maximises its balanced accuracy there, and candidates compare on balanced accuracy.
    Returns (the winner, its tau or None, {candidate: scores})."""
    saved = copy.deepcopy(tail.model.state_dict())
    metric = "accuracy" if prior is None else "balanced_accuracy"
    scores: dict[str, dict] = {}
    trial = replace(plan, early_stop=0, checkpoint_every=0, eval_every=0, why={})
    for head in candidates:
        if head in FITS:
            fit = fit_closed_form_head(tail, replace(plan, head=head), train_views[0], y_fit)
            logits = fit.logits(pooled_features(tail, held_rows))
        else:
            train_cached(tail, train_views, y_fit, held_rows, y_held, trial, lambda record: None, f"{TRIAL}{head} head", task=task)
            logits = predict_cached(tail, held_rows).numpy()
        scores[head] = {}
        if prior is not None:
            tau, _ = best_tau(logits, np.asarray(y_held), prior)
            logits, scores[head]["tau"] = adjusted(logits, prior, tau), tau
        value, loss = score(logits, np.asarray(y_held), balanced=prior is not None)
        scores[head].update({metric: round(value, 4), "log_loss": round(loss, 4)})
        tail.model.load_state_dict(saved)
    best = candidates[0]
    for head in candidates[1:]:
        if clearly_better(scores[head][metric], scores[best][metric], len(y_held)):
            best = head
    return best, scores[best].get("tau"), scores


def clearly_better(challenger: float, incumbent: float, n: int) -> bool:
    """The challenger wins only by more than one standard error of a difference of two scores on the same
    n images (a 0.5-point lead on 80 images is noise: the bench's fmnist-500 trial picked the probe by 1
    image of 80 and lost 1.6 points on the validation set). The incumbent is the plan's own recipe."""
    spread = np.sqrt(max(challenger * (1 - challenger) + incumbent * (1 - incumbent), 1e-12) / max(n, 1))
    return challenger - incumbent > spread
