"""Selection images: the training images set aside for a run's automatic choices, so that no choice is
made on the validation images the run reports on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visiontune.data.catalog import Catalog
from visiontune.data.split import hold_out
from visiontune.pipeline.inputs import CachedInputs
from visiontune.pipeline.prepare import Prepared
from visiontune.runs import RunConfig
from visiontune.train.plan import Plan


#: Fraction of the training images held out as selection images when the run makes an automatic choice.
SELECTION_FRACTION = 0.15


@dataclass
class Selection:
    """Training images set aside for the run's automatic choices (early stopping's epoch, the batch-size
    search, the head, multi-label thresholds), so that none is made on the validation images the run
    reports on. Choices made before training (batch size, head) are scored on `held` after trial fits on
    `fit`, and the run then trains on every training image; choices made during or after training (early
    stopping, thresholds) keep `held` out of training for good (`keeps_out`)."""

    fit: np.ndarray  # positions in the training catalog the trials (and, with keeps_out, the run) train on
    held: np.ndarray  # positions of the selection images
    rows: object  # cached activations of the selection images (plain view)
    y: np.ndarray  # their targets
    catalog: Catalog  # their files (fine-tuning validates on images)
    reason: str
    keeps_out: bool = True

    def rows_and_targets(self) -> tuple:
        return self.rows, self.y


def carve_selection(prep: Prepared, config: RunConfig, inputs: CachedInputs, y_train: np.ndarray) -> Selection | None:
    """A stratified SELECTION_FRACTION of the training images when the plan makes a choice on data, else None."""
    plan = prep.plan
    during = [name for name, needed in (
        ("the early-stopping epoch", plan.early_stop > 0), ("the decision thresholds", prep.task.tunes_decisions),
    ) if needed]
    before = [name for name, needed in (
        ("the batch size", "batch_size" in config.auto), ("the classifier head", plan.head == "auto"),
        ("the logit adjustment", tau_to_choose(plan, config)),
    ) if needed]
    if not during + before:
        return None
    fit, held = hold_out(prep.train.labels, SELECTION_FRACTION, plan.seed + 1)
    if len(held) == 0 or len(fit) == 0:
        return None
    reason = (f"{' and '.join(during + before)} chosen on {len(held)} images carved from the training images "
              f"({SELECTION_FRACTION:.0%}, stratified), never on the reported validation images")
    reason += "; not trained on" if during else "; the run then trains on every training image"
    return Selection(fit, held, inputs.train_views[0][held], y_train[held], prep.train.subset([int(i) for i in held]),
                     reason, keeps_out=bool(during))


def tau_to_choose(plan: Plan, config: RunConfig) -> bool:
    """The logit adjustment's strength is chosen on the selection images when the head's trial runs anyway
    (`--head auto`) and you did not set it (--balance-tau); otherwise it stays at 1, the Bayes-optimal shift
    of a calibrated model (no extra trial training on larger data)."""
    return plan.balance == "logit-adjust" and plan.head == "auto" and config.overrides.get("balance_tau") is None
