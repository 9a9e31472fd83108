"""Small, imbalanced and colour data (issue I §3, §5): visiontune's default vs the cross-validated linear
probe, on folders nobody tuned for, in ONE run.

Datasets (all offline, written once under bench/.data/):
* fmnist-500: Fashion-MNIST, 50 training / 50 validation images per class (1,000 images);
* fmnist-2k: the speed bench's 200 / 200 per class;
* digits-500: scikit-learn digits, 50 training images per class, the other 1,297 for validation;
* photo-patches: COLOUR. Ten natural photos shipped inside scikit-image and scikit-learn (astronaut, cat,
  coffee, Hubble deep field, immunohistochemistry, motorcycle, retina, rocket, China, flower); each image
  is a random patch (8-25 % of the photo's side, random flips, JPEG quality 60-95) and its class is the
  photo it came from: 30 training / 60 validation per class (900 images);
* fmnist-imbalanced: Fashion-MNIST with 200 training images per class except `shirt` and `pullover` (20
  each: 10 %), validation balanced (100 per class); its figure is balanced accuracy.

Rows per dataset, each in a fresh process with an empty feature cache:
* probe: pooled Lite0 features on onnxruntime (visiontune's engine), then scikit-learn's
  LogisticRegressionCV (10 Cs, 5-fold CV on the training images, every core) — the strongest fair probe;
* visiontune: `visiontune train DATA` with no option.

    .venv/bin/python bench/small_data.py            # ~10 min on 2 cores
Writes bench/results/small_data.json and bench/results/small_data.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT / ".data"
RESULTS = ROOT / "results"


# ------------------------------------------------------------------------------------------- datasets
def _photos() -> dict[str, np.ndarray]:
    """Ten colour photos that ship inside the scikit-image and scikit-learn wheels (no download)."""
    from skimage import data as sk
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(sk, name)() for name in ("astronaut", "chelsea", "coffee", "hubble_deep_field",
                                                     "immunohistochemistry", "retina", "rocket")}
    photos["motorcycle"] = sk.stereo_motorcycle()[0]
    china, flower = load_sample_images().images
    photos["china"], photos["flower"] = china, flower
    return {name: np.asarray(image)[..., :3] for name, image in photos.items()}


def export_photo_patches(dest: Path, train_per_class: int = 30, valid_per_class: int = 60, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, photo in sorted(_photos().items()):
        h, w = photo.shape[:2]
        for part, count in (("train", train_per_class), ("valid", valid_per_class)):
            folder = dest / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                side = int(min(h, w) * rng.uniform(0.08, 0.25))
                y, x = rng.integers(0, h - side), rng.integers(0, w - side)
                patch = Image.fromarray(photo[y : y + side, x : x + side]).resize((64, 64), Image.BILINEAR)
                if rng.random() < 0.5:
                    patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
                if rng.random() < 0.5:
                    patch = patch.transpose(Image.FLIP_TOP_BOTTOM)
                buffer = io.BytesIO()
                patch.save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
                (folder / f"{part}-{k:03d}.jpg").write_bytes(buffer.getvalue())


def export_digits_split(dest: Path, train_per_class: int = 50, seed: int = 0) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    train = set()
    for c in range(10):
        train.update(rng.choice(np.flatnonzero(digits.target == c), train_per_class, replace=False).tolist())
    for n, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = dest / ("train" if n in train else "valid") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8)).save(folder / f"{n:04d}.png")


def _fmnist(**kwargs):
    from visiontune.data.demo import export_fashion_mnist

    return lambda dest: export_fashion_mnist(dest, seed=0, **kwargs)


DATASETS = {
    "fmnist-500": _fmnist(train_per_class=50, valid_per_class=50),
    "fmnist-2k": _fmnist(train_per_class=200, valid_per_class=200),
    "digits-500": export_digits_split,
    "photo-patches": export_photo_patches,
    "fmnist-imbalanced": _fmnist(train_per_class=200, valid_per_class=100, scarce={"shirt": 20, "pullover": 20}),
}


#: Other ways to meet imbalance, measured beside the default (logit adjustment) on the imbalanced set.
VARIANTS = {"fmnist-imbalanced": {
    "no balancing": ("--balance", "none"),
    "class weights": ("--balance", "none", "--class-weights", "balanced"),
    "balanced sampler": ("--balance", "none", "--sampler", "balanced"),
}}


def ensure(name: str) -> Path:
    folder = DATA / f"small-{name}"
    if not (folder / "train").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        DATASETS[name](folder)
    return folder


# ----------------------------------------------------------------------------------------------- rows
def row_probe(folder: Path) -> dict:
    """Pooled features on onnxruntime (the export visiontune's cache uses), LogisticRegressionCV on every core."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from visiontune.backbones.registry import create_backbone
    from visiontune.data.catalog import discover
    from visiontune.data.images import load_rgb
    from visiontune.data.transforms import eval_transform
    import onnxruntime as ort

    source = discover(folder, check=False)
    backbone = create_backbone("tf_efficientnet_lite0", num_classes=0)
    native = backbone.preprocessing.input_size
    size = 112 if max(load_rgb(source.train.paths[0]).size) * 2 <= native else native  # the plan's rule
    preprocessing = backbone.preprocessing.with_size(size)
    onnx_path = Path(tempfile.mkdtemp()) / "lite0.onnx"
    torch.onnx.export(backbone.model.eval(), torch.zeros(1, 3, size, size), str(onnx_path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    transform = eval_transform(preprocessing)

    def features(paths):
        out = []
        for start in range(0, len(paths), 64):
            x = torch.stack([transform(load_rgb(p)) for p in paths[start : start + 64]]).numpy()
            out.append(session.run(None, {"x": np.ascontiguousarray(x)})[0])
        return np.concatenate(out)

    scaler = StandardScaler().fit(x_train := features(source.train.paths))
    probe = LogisticRegressionCV(Cs=10, cv=5, max_iter=2000, n_jobs=-1).fit(scaler.transform(x_train), source.train.labels)
    predicted = probe.predict(scaler.transform(features(source.valid.paths)))
    y = np.asarray(source.valid.labels)
    return {"accuracy": float((predicted == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "C": float(probe.C_[0]), "img_size": size}


def run_probe(folder: Path) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--probe", str(folder)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_seconds": round(time.perf_counter() - started, 1)}


def run_visiontune(folder: Path, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VISIONTUNE_CACHE": str(Path(tmp) / "cache")}
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "visiontune", "train", str(folder), "--out", str(Path(tmp) / "run"), *extra],
                             capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        meta = json.loads((Path(tmp) / "run" / "classifier" / "classifier.json").read_text())
        plan = json.loads((Path(tmp) / "run" / "plan.json").read_text())
        report_s = next((float(line.split("(")[-1].rstrip("s)")) for line in out.stderr.splitlines()
                         if line.startswith("report: ")), None)
    return {"accuracy": meta["metrics"]["accuracy"], "balanced_accuracy": meta["metrics"]["balanced_accuracy"],
            "wall_seconds": round(wall, 1), "report_seconds": report_s,
            "plan": {k: plan.get(k) for k in ("recipe", "cut", "head", "img_size", "epochs", "balance")},
            "why_head": plan["why"].get("head"), "args": " ".join(extra)}


def write_markdown(results: dict) -> None:
    lines = ["| dataset | images (train/valid) | figure | probe | visiontune default | default - probe | probe wall s | "
             "visiontune wall s | limit 2x probe + 10 s | report s | plan (cut, head) |", "|---" * 11 + "|"]
    for name, row in results["datasets"].items():
        figure = "balanced_accuracy" if "imbalanced" in name else "accuracy"
        probe, ours = row["probe"], row["visiontune"]
        limit = 2 * probe["wall_seconds"] + 10
        lines.append(
            f"| {name} | {row['n_train']}/{row['n_valid']} | {figure} | {probe[figure]:.4f} | {ours[figure]:.4f} | "
            f"{ours[figure] - probe[figure]:+.4f} | {probe['wall_seconds']:.1f} | {ours['wall_seconds']:.1f} | "
            f"{limit:.1f} ({'met' if ours['wall_seconds'] <= limit else 'NOT met'}) | {ours['report_seconds']} | "
            f"{ours['plan']['cut']}, {ours['plan']['head']} |")
    for name, row in results["datasets"].items():
        if row.get("variants"):
            lines += ["", f"{name}: the default's logit adjustment beside the other ways to meet imbalance", "",
                      "| visiontune | options | accuracy | balanced accuracy | wall s |", "|---|---|---|---|---|"]
            for label, ours in [("default (logit adjustment)", row["visiontune"]), *row["variants"].items()]:
                lines.append(f"| {label} | `{ours['args'] or '(none)'}` | {ours['accuracy']:.4f} | "
                             f"{ours['balanced_accuracy']:.4f} | {ours['wall_seconds']:.1f} |")
    (RESULTS / "small_data.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", help="(internal) run the probe row on one folder and print its JSON")
    parser.add_argument("--only", nargs="*", choices=sorted(DATASETS), help="datasets to run (default: all)")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(row_probe(Path(args.probe))))
        return
    path = RESULTS / "small_data.json"
    results = json.loads(path.read_text()) if args.only and path.exists() else {"machine": {"cpus": os.cpu_count()}, "datasets": {}}
    for name in args.only or DATASETS:
        folder = ensure(name)
        count = {part: sum(1 for _ in (folder / part).rglob("*.*")) for part in ("train", "valid")}
        row = {"n_train": count["train"], "n_valid": count["valid"], "probe": run_probe(folder), "visiontune": run_visiontune(folder)}
        row["variants"] = {label: run_visiontune(folder, *args) for label, args in VARIANTS.get(name, {}).items()}
        results["datasets"][name] = row
        print(name, json.dumps(row), flush=True)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        write_markdown(results)


if __name__ == "__main__":
    main()
