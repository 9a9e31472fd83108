"""Semi-supervised learning and domain adaptation benchmarks (issue F), every row a fresh `visiontune train`
process with an empty feature cache, so caching the extra images is part of each row's wall time.

SSL: Fashion-MNIST (Debian `dataset-fashion-mnist`), 40 labelled images per class (400) from the train
split, 10,000 other train images as the unlabelled folder (no class folders), 2,000 validation images
(200 per class) from the test split. Rows: labelled-only (the default `train`), each `--ssl` method,
`--ssl auto`, and the oracle (all 10,400 training images labelled).

DA: a shifted target built from Fashion-MNIST the way MNIST-M was built from MNIST: each item's pixels
are blended with a random patch of a natural photo (scikit-image and scikit-learn sample photos) as
|patch - item|, so colours and textures change and classes do not. Source: 2,000 plain labelled train
images (class folders; visiontune holds 20 % out for validation). Target: 2,000 other train items,
blended, unlabelled. Evaluation: 2,000 blended test items (200 per class), read only after training via
`--target-labels`. Rows: source-only (`--adapt none`), each `--adapt` method, `--adapt auto`, and the
target oracle (trained on the 2,000 target images with their labels, validated on the evaluation set).

DA on digits (`adapt-digits`): the same shift and rows on a second, smaller dataset — scikit-learn's 1,797
8x8 digits upscaled to 28 px; 900 plain labelled source images, 450 blended unlabelled target images, 447
blended evaluation images. A check that `--adapt auto`'s choice holds off the main bench (a first build of it
is what showed auto must score target images its trials did not train on).

    .venv/bin/python bench/beyond_labels.py ssl            # ~25 min on 2 cores
    .venv/bin/python bench/beyond_labels.py adapt          # ~15 min
    .venv/bin/python bench/beyond_labels.py adapt-digits   # ~8 min
Writes bench/results/ssl|adapt|adapt-digits.json|md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from visiontune.names import BUILTIN_METHODS

ROOT = Path(__file__).resolve().parent
DATA = ROOT / ".data"
RESULTS = ROOT / "results"
SSL_METHODS = list(BUILTIN_METHODS["ssl"])  # the built-in methods, in visiontune's trial order
ADAPT_METHODS = [m for m in BUILTIN_METHODS["adapt"] if m != "none"]  # "none" is the source-only row


# ------------------------------------------------------------------------------------------------ data
def _write(folder: Path, images: np.ndarray, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)


def _balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
    allowed = np.ones(len(labels), bool)
    if exclude is not None:
        allowed[exclude] = False
    return np.sort(np.concatenate([rng.choice(np.flatnonzero((labels == c) & allowed), per_class, replace=False)
                                   for c in np.unique(labels)]))


def ssl_data() -> Path:
    """labelled/train (40/class), labelled/valid (200/class, test split), unlabelled/ (10,000 flat), oracle/."""
    from visiontune.data.demo import FASHION_CLASSES, load_fashion_mnist

    root = DATA / "fmnist-ssl"
    if (root / "oracle" / "valid").is_dir():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    x, y = load_fashion_mnist("train")
    tx, ty = load_fashion_mnist("test")
    labelled = _balanced(y, 40, rng)
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    unlabelled = np.sort(rng.choice(rest, 10_000, replace=False))
    valid = _balanced(ty, 200, rng)
    for i in labelled:
        for part in ("labelled", "oracle"):
            _write(root / part / "train" / FASHION_CLASSES[y[i]], x[i : i + 1], [f"train-{i:05d}.png"])
    for i in unlabelled:
        _write(root / "unlabelled", x[i : i + 1], [f"train-{i:05d}.png"])
        _write(root / "oracle" / "train" / FASHION_CLASSES[y[i]], x[i : i + 1], [f"train-{i:05d}.png"])
    for i in valid:
        for part in ("labelled", "oracle"):
            _write(root / part / "valid" / FASHION_CLASSES[ty[i]], tx[i : i + 1], [f"test-{i:05d}.png"])
    return root


def _photos() -> list[np.ndarray]:
    """Natural colour photos that ship inside scikit-image and scikit-learn (no download)."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.hubble_deep_field()]
    photos += list(load_sample_images().images)
    return [p[..., :3].astype(np.uint8) for p in photos]


def blend(items: np.ndarray, rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """MNIST-M's recipe: |random 28x28 photo patch (RGB) - item|, one fresh patch per item."""
    out = np.empty((len(items), 28, 28, 3), dtype=np.uint8)
    for k, item in enumerate(items):
        photo = photos[rng.integers(len(photos))]
        y0, x0 = rng.integers(0, photo.shape[0] - 28), rng.integers(0, photo.shape[1] - 28)
        patch = photo[y0 : y0 + 28, x0 : x0 + 28].astype(np.int16)
        out[k] = np.abs(patch - item.astype(np.int16)[..., None]).astype(np.uint8)
    return out


def adapt_data() -> Path:
    """source/ (2,000 plain, class folders), target/ (2,000 blended, flat), target_eval/ (2,000 blended test,
    class folders), oracle/train (the target images with labels) + oracle/valid (= target_eval)."""
    from visiontune.data.demo import FASHION_CLASSES, load_fashion_mnist

    root = DATA / "fmnist-da"
    if (root / "oracle" / "valid").is_dir():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    photos = _photos()
    x, y = load_fashion_mnist("train")
    tx, ty = load_fashion_mnist("test")
    source = _balanced(y, 200, rng)
    target = _balanced(y, 200, rng, exclude=source)
    evaluation = _balanced(ty, 200, rng)
    _write_domains(root, FASHION_CLASSES,
                   (x[source], y[source], [f"train-{i:05d}.png" for i in source]),
                   (blend(x[target], rng, photos), y[target], [f"train-{i:05d}.png" for i in target]),
                   (blend(tx[evaluation], rng, photos), ty[evaluation], [f"test-{i:05d}.png" for i in evaluation]))
    return root


def _write_domains(root: Path, classes: list[str], source: tuple, target: tuple, evaluation: tuple) -> None:
    """The DA layout from (images, labels, file names) per part: source/<class>/, target/ (flat, unlabelled),
    target_eval/<class>/, and the oracle's train (the target images with their labels) and valid (= target_eval)."""
    for (images, labels, names), folders in ((source, ["source/{}"]), (target, ["target", "oracle/train/{}"]),
                                             (evaluation, ["target_eval/{}", "oracle/valid/{}"])):
        for k, (label, name) in enumerate(zip(labels, names)):
            for folder in folders:
                _write(root / folder.format(classes[label]), images[k : k + 1], [name])


def adapt_digits_data() -> Path:
    """adapt_data's layout from scikit-learn's digits (8x8, upscaled to 28 px): a random 900 / 450 / 447 split
    into source, target and evaluation images."""
    from sklearn.datasets import load_digits

    root = DATA / "digits-da"
    if (root / "oracle" / "valid").is_dir():
        return root
    shutil.rmtree(root, ignore_errors=True)
    digits = load_digits()
    x = np.stack([np.asarray(Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
                  for image in digits.images])
    y = digits.target
    rng = np.random.default_rng(1)
    order = rng.permutation(len(y))
    source, target, evaluation = order[:900], order[900:1350], order[1350:]
    photos = _photos()
    _write_domains(root, [str(d) for d in range(10)],
                   (x[source], y[source], [f"{i:04d}.png" for i in source]),
                   (blend(x[target], rng, photos), y[target], [f"{i:04d}.png" for i in target]),
                   (blend(x[evaluation], rng, photos), y[evaluation], [f"{i:04d}.png" for i in evaluation]))
    return root


# ------------------------------------------------------------------------------------------------ rows
def run_train(label: str, data: Path, *extra: str) -> dict:
    """`visiontune train` in a fresh process with an empty feature cache; accuracy, wall time, plan."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VISIONTUNE_CACHE": str(Path(tmp) / "cache")}
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "visiontune.cli", "train", str(data), "--out", str(Path(tmp) / "run"),
                              "--no-report", *extra], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{out.stderr[-3000:]}")
        meta = json.loads((Path(tmp) / "run" / "classifier" / "classifier.json").read_text())
        plan = json.loads((Path(tmp) / "run" / "plan.json").read_text())
        auto_path = Path(tmp) / "run" / "auto.json"
        auto = json.loads(auto_path.read_text()) if auto_path.exists() else None
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    metrics = meta["metrics"]
    result = {"accuracy": metrics["accuracy"], "wall_seconds": round(wall, 1), "args": " ".join(extra),
              "plan": {k: plan.get(k) for k in ("cut", "epochs", "batch_size", "objective", "ssl", "adapt")}}
    if "target_accuracy" in metrics:
        result["target_accuracy"] = metrics["target_accuracy"]
        result["beyond"] = metrics.get("beyond")
    pseudo = [r.get("train_pseudo_fraction") for r in records if r.get("kind") is None and "train_pseudo_fraction" in r]
    if pseudo:
        result["pseudo_fraction_by_epoch"] = [round(p, 3) for p in pseudo]
    if auto:
        result["auto"] = auto
    print(f"{label:28s} {json.dumps(result)}", flush=True)
    return result


def gap_closed(value: float, low: float, high: float) -> float:
    return (value - low) / (high - low) if high != low else 0.0


def measured_rows(planned: list[tuple[str, Callable[[], dict]]], only: list[str] | None, results: str) -> dict:
    """Each planned row measured now and dated; with `only`, just those rows, the others kept as they are in
    bench/results/<results>.json (with the date they were measured)."""
    kept = json.loads((RESULTS / f"{results}.json").read_text())["rows"] if only else {}
    today = time.strftime("%Y-%m-%d")
    rows = {}
    for name, measure in planned:
        if only and name not in only:
            rows[name] = kept.get(name, {"accuracy": float("nan"), "wall_seconds": float("nan"), "note": "not measured"})
        else:
            rows[name] = {**measure(), "measured": today}
    return rows


def bench_ssl(oracle: str | None = None, only: list[str] | None = None) -> dict:
    """`oracle` = "ACCURACY,SECONDS" reuses an oracle row measured by an earlier run of this script (its
    10,400-image default train takes ~15 min here); the results say so. `only`: rerun just these rows
    (:func:`measured_rows`)."""
    root = ssl_data()
    unlabelled = ["--unlabeled", str(root / "unlabelled")]

    def oracle_row() -> dict:
        if not oracle:
            return run_train("oracle", root / "oracle")
        accuracy, seconds = map(float, oracle.split(","))
        return {"accuracy": accuracy, "wall_seconds": seconds, "args": "",
                "note": "not rerun: measured earlier the same day with `run_train('oracle', oracle/)`"}

    planned = [("labelled-only", lambda: run_train("labelled-only", root / "labelled")),
               *[(m, lambda m=m: run_train(m, root / "labelled", *unlabelled, "--ssl", m)) for m in [*SSL_METHODS, "auto"]],
               ("oracle", oracle_row)]
    rows = measured_rows(planned, only, "ssl")
    low, high, base_time = rows["labelled-only"]["accuracy"], rows["oracle"]["accuracy"], rows["labelled-only"]["wall_seconds"]
    for row in rows.values():
        row["gap_closed"] = round(gap_closed(row["accuracy"], low, high), 3)
        same_day = row.get("measured") == rows["labelled-only"].get("measured")  # a time ratio only within one sitting
        row["time_vs_labelled_only"] = round(row["wall_seconds"] / base_time, 2) if same_day else None
    best = max(SSL_METHODS, key=lambda m: rows[m]["accuracy"])
    summary = {"best": best, "best_gap_closed": rows[best]["gap_closed"], "best_time_ratio": rows[best]["time_vs_labelled_only"],
               "auto_picked": rows["auto"]["plan"]["ssl"], "auto_minus_best": round(rows["auto"]["accuracy"] - rows[best]["accuracy"], 4)}
    return {"rows": rows, "summary": summary}


def bench_adapt(only: list[str] | None = None, data: Callable[[], Path] = adapt_data, results: str = "adapt") -> dict:
    """`only`: rerun just these rows (:func:`measured_rows`); `data`/`results`: the dataset and its results file."""
    root = data()
    common = ["--target", str(root / "target"), "--target-labels", str(root / "target_eval")]

    def oracle_row() -> dict:
        row = run_train("target oracle", root / "oracle")
        return {**row, "target_accuracy": row["accuracy"]}

    planned = [*[(name, lambda name=name, method=method: run_train(name, root / "source", *common, "--adapt", method))
                 for name, method in [("source-only", "none"), *[(m, m) for m in ADAPT_METHODS], ("auto", "auto")]],
               ("target-oracle", oracle_row)]
    rows = measured_rows(planned, only, results)
    low, high = rows["source-only"]["target_accuracy"], rows["target-oracle"]["target_accuracy"]
    for row in rows.values():
        row["gap_closed"] = round(gap_closed(row["target_accuracy"], low, high), 3)
        row["vs_source_only"] = round(row["target_accuracy"] - low, 4)
    best = max(ADAPT_METHODS, key=lambda m: rows[m]["target_accuracy"])
    summary = {"best": best, "best_gap_closed": rows[best]["gap_closed"], "auto_picked": rows["auto"]["plan"]["adapt"],
               "auto_minus_best": round(rows["auto"]["target_accuracy"] - rows[best]["target_accuracy"], 4),
               "worse_than_source_only_by_1pt": [m for m in ADAPT_METHODS if rows[m]["vs_source_only"] < -0.01]}
    return {"rows": rows, "summary": summary}


def table(results: dict, key: str) -> str:
    lines = [f"| row | {key.replace('_', ' ')} | gap closed | wall s | measured | notes |", "|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        notes = [row["note"]] if row.get("note") else []
        if row.get("time_vs_labelled_only"):
            notes = [f"{row['time_vs_labelled_only']}x labelled-only time"]
        if name == "auto" and "auto" in row:
            notes.append(f"picked {row['plan'].get('ssl') or row['plan'].get('adapt')}")
        lines.append(f"| {name} | {row[key]:.4f} | {row['gap_closed']:+.2f} | {row['wall_seconds']} | "
                     f"{row.get('measured', '')} | {'; '.join(notes)} |")
    lines.append("")
    lines.append("summary: " + json.dumps(results["summary"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["ssl", "adapt", "adapt-digits", "data"])
    parser.add_argument("--oracle", metavar="ACC,SECONDS", help="ssl: reuse an oracle row measured earlier")
    parser.add_argument("--only", nargs="+", metavar="ROW", help="rerun only these rows, keep the others")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.which == "data":
        print(ssl_data(), adapt_data(), adapt_digits_data())
        return
    if args.which == "ssl":
        results = bench_ssl(args.oracle, args.only)
    else:
        results = bench_adapt(args.only, *((adapt_digits_data, "adapt-digits") if args.which == "adapt-digits" else ()))
    results["date"] = time.strftime("%Y-%m-%d")
    (RESULTS / f"{args.which}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.which}.md").write_text(table(results, "accuracy" if args.which == "ssl" else "target_accuracy"))
    print(table(results, "accuracy" if args.which == "ssl" else "target_accuracy"))


if __name__ == "__main__":
    main()
