"""Prior shift (issue J): a classifier trained on imbalanced data, evaluated on images with other class
proportions, without and with `--prior` correction.

Training: bench/small_data.py's fmnist-imbalanced (200 images per class, `shirt` and `pullover` 20 each),
trained with `--balance none` so the model keeps the training prior (the default's logit adjustment would
already aim at balanced data). Evaluation sets, both from the Fashion-MNIST test split:
* balanced: the 1,000 validation images (100 per class);
* skewed: the same images subsampled to other proportions (shirt and pullover 100 each, the others 25).
Rows: no correction, `--prior balanced`, `--prior estimate` (EM on the images, labels unread), and the
true proportions given (`--prior a,b,c`, an oracle). Figures: accuracy, balanced accuracy and log loss.

    .venv/bin/python bench/prior_shift.py      # ~1 min on 2 cores
Writes bench/results/prior_shift.json and bench/results/prior_shift.md.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from small_data import ensure  # bench/small_data.py

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SKEWED_KEEP = {"shirt": 100, "pullover": 100}
OTHERS_KEEP = 25


def skewed_copy(valid: Path, dest: Path) -> dict[str, int]:
    counts = {}
    for folder in sorted(p for p in valid.iterdir() if p.is_dir()):
        keep = SKEWED_KEEP.get(folder.name, OTHERS_KEEP)
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir())[:keep]:
            (dest / folder.name / path.name).symlink_to(path)
        counts[folder.name] = keep
    return counts


def main() -> None:
    import visiontune as vt

    data = ensure("fmnist-imbalanced")
    results: dict = {"train": "fmnist-imbalanced, --balance none", "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        clf = vt.fit(data, out=run, report=False, balance="none")
        counts = skewed_copy(data / "valid", Path(tmp) / "skewed")
        classes = clf.classes
        true_skewed = ",".join(str(counts[c]) for c in classes)
        for name, folder, truth in (("balanced", data / "valid", ",".join("1" for _ in classes)),
                                    ("skewed", Path(tmp) / "skewed", true_skewed)):
            rows = {}
            for label, prior in (("none", None), ("balanced", "balanced"), ("estimate", "estimate"), ("true proportions", truth)):
                metrics = vt.evaluate(clf, folder, prior=prior)
                rows[label] = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "log_loss", "n")}
                if "prior" in metrics:
                    rows[label]["prior"] = metrics["prior"]
                print(name, label, json.dumps(rows[label]), flush=True)
            results["sets"][name] = rows
        shutil.rmtree(run, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prior_shift.json").write_text(json.dumps(results, indent=2))
    lines = ["| evaluation set | --prior | accuracy | balanced accuracy | log loss |", "|---|---|---|---|---|"]
    for name, rows in results["sets"].items():
        for label, row in rows.items():
            lines.append(f"| {name} ({row['n']}) | {label} | {row['accuracy']:.4f} | {row['balanced_accuracy']:.4f} | {row['log_loss']:.4f} |")
    (RESULTS / "prior_shift.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
