"""Kaggle submissions in the exact format of the competition's sample file.

The sample's first column is the id (matched to image file names without extension, or with it); the
rest decide the format: one non-class column -> the predicted label; class-name columns -> one probability
per class, in the sample's column order. Rows come out in the sample's order with its exact header.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from visiontune.classifier import Classifier
from visiontune.data.catalog import DataError
from visiontune.errors import UsageError
from visiontune.files import written_whole


def read_sample(sample: Path) -> tuple[list[str], list[str]]:
    with sample.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or len(rows[0]) < 2:
        raise DataError(f"{sample}: a sample submission needs a header with an id column and at least one more")
    return rows[0], [r[0] for r in rows[1:] if r]


def match_ids(ids: list[str], paths: list[Path]) -> list[Path]:
    by_name = {}
    for p in paths:
        by_name.setdefault(p.stem, p)
        by_name.setdefault(p.name, p)
    missing = [i for i in ids if i not in by_name]
    if missing:
        raise DataError(
            f"{len(missing)} ids of the sample submission have no image (e.g. {', '.join(missing[:3])}); "
            "pass the folder with the test images (file names = ids)"
        )
    return [by_name[i] for i in ids]


def write_submission(classifier: Classifier, sample: Path, paths: list[Path], out: Path, batch_size: int = 32,
                     tta: str = "none", engine: str = "auto") -> dict:
    """Predict the sample's ids and write `out` in its format; returns counts."""
    if out.exists():
        raise UsageError(f"{out} exists; nothing was overwritten. Choose another --csv or delete it yourself.")
    header, ids = read_sample(sample)
    files = match_ids(ids, paths)
    columns = header[1:]
    known = set(classifier.classes)
    probability_format = all(c in known for c in columns)
    if not probability_format and len(columns) != 1:
        raise DataError(f"{sample}: columns {columns} are neither one label column nor class names {classifier.classes}")
    skipped = []
    kept, probs = classifier.probabilities(files, batch_size, skipped=skipped, tta=tta, engine=engine)
    full = np.full((len(files), len(classifier.classes)), 1.0 / len(classifier.classes))
    full[kept] = probs
    index = [classifier.classes.index(c) for c in columns] if probability_format else []
    with written_whole(out) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row_id, row in zip(ids, full):
            if probability_format:
                writer.writerow([row_id, *(f"{row[j]:.6f}" for j in index)])
            else:
                writer.writerow([row_id, classifier.classes[int(row.argmax())]])
    return {"rows": len(ids), "unreadable": len(skipped), "format": "probabilities" if probability_format else "label"}
