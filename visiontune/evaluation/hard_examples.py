"""Hard-example mining on the training images: what the model gets wrong or only barely right.

Each training image is scored by the trained classifier. Kinds:
* ``likely-label-error`` — wrong with high confidence (p(predicted) >= `confident`): on data the model
  otherwise fits, a confident disagreement with the label is most often a wrong label;
* ``wrong`` — any other mistake;
* ``barely-right`` — right, but the top-2 margin is below `margin`.
The CSV feeds `visiontune train --upweight hard.csv`, which draws those images `factor` times as often.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiontune.files import written_whole



@dataclass
class HardExample:
    path: str
    label: str
    predicted: str
    p_label: float
    p_predicted: float
    margin: float
    kind: str


def classify_hardness(probs: np.ndarray, labels: np.ndarray, margin: float = 0.2, confident: float = 0.9) -> list[str | None]:
    """The kind of each row (None: an easy, clearly right image)."""
    ordered = np.sort(probs, axis=1)
    margins = ordered[:, -1] - ordered[:, -2]
    preds = probs.argmax(1)
    kinds: list[str | None] = []
    for pred, label, top, gap in zip(preds, labels, ordered[:, -1], margins):
        if pred != label:
            kinds.append("likely-label-error" if top >= confident else "wrong")
        else:
            kinds.append("barely-right" if gap < margin else None)
    return kinds


def mine_hard_examples(
    probs: np.ndarray, kept: np.ndarray, paths: list[str], labels: list[int], classes: list[str],
    margin: float = 0.2, confident: float = 0.9,
) -> list[HardExample]:
    """Hard examples among `paths` from the model's probabilities of the readable ones (`kept` positions);
    the model is run by the caller (`visiontune.api.hard_examples`), so this layer needs no classifier."""
    y = np.asarray(labels)[kept]
    kinds = classify_hardness(probs, y, margin, confident)
    ordered = np.sort(probs, axis=1)
    found = []
    for row, (position, kind) in enumerate(zip(kept, kinds)):
        if kind is None:
            continue
        pred = int(probs[row].argmax())
        found.append(HardExample(
            str(paths[position]), classes[y[row]], classes[pred], float(probs[row, y[row]]),
            float(probs[row, pred]), float(ordered[row, -1] - ordered[row, -2]), kind,
        ))
    order = {"likely-label-error": 0, "wrong": 1, "barely-right": 2}
    return sorted(found, key=lambda h: (order[h.kind], h.p_label))


def write_hard_examples(examples: list[HardExample], out: Path) -> Path:
    with written_whole(out) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "predicted", "p_label", "p_predicted", "margin", "kind"])
        for h in examples:
            writer.writerow([h.path, h.label, h.predicted, f"{h.p_label:.4f}", f"{h.p_predicted:.4f}", f"{h.margin:.4f}", h.kind])
    return out


def read_upweighted(csv_path: str | Path) -> set[str]:
    """Resolved paths listed in a hard-examples CSV."""
    with Path(csv_path).open(newline="") as handle:
        return {str(Path(row["path"]).resolve()) for row in csv.DictReader(handle)}
