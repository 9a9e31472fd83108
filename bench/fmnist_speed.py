"""Speed/accuracy benchmark: visiontune vs fastai, a linear probe and the one-pass floors, in ONE run.

Data: Fashion-MNIST (Debian package `dataset-fashion-mnist`), 2,000 training images (200 per class,
seeded) and 2,000 validation images (200 per class) from its test split, written as PNG files.
Backbone everywhere: timm `tf_efficientnet_lite0` with the packaged ImageNet weights, 112 px.

Every row runs in a fresh process (`--row NAME`), so no row warms caches for another; trainers are timed
by the wall clock of their whole process (imports included, for every peer alike); floors by their pass
over the 4,000 images (decode + resize + forward), model loading excluded.

    .venv/bin/python bench/fmnist_speed.py                 # everything (~25 min on 2 cores)
    .venv/bin/python bench/fmnist_speed.py --skip-fastai   # without the two fastai rows
Writes bench/results/fmnist_speed.json, bench/results/fmnist_speed.md and bench/results/fmnist_speed.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = ROOT / ".data" / "fmnist-2k"
RESULTS = ROOT / "results"
SIZE = 112
BATCH = 64


# ----------------------------------------------------------------------------------------------- rows
def _paths() -> tuple[list[Path], list[int], list[Path], list[int]]:
    from visiontune.data.catalog import discover

    source = discover(DATA, check=False)
    return source.train.paths, source.train.labels, source.valid.paths, source.valid.labels


def _lite0(num_classes: int = 0):
    from visiontune.backbones.registry import create_backbone

    import torch

    backbone = create_backbone("tf_efficientnet_lite0", num_classes=num_classes, img_size=SIZE)
    return backbone.model.eval().to(memory_format=torch.contiguous_format), backbone.preprocessing


def _batches(paths: list[Path], preprocessing):
    """Plain loop: PIL decode + resize + crop + normalise, in this process (the naive way)."""
    import torch

    from visiontune.data.images import load_rgb
    from visiontune.data.transforms import eval_transform

    transform = eval_transform(preprocessing)
    for start in range(0, len(paths), BATCH):
        yield torch.stack([transform(load_rgb(p)) for p in paths[start : start + BATCH]])


def _torch_pass(channels_last: bool, bf16: bool) -> dict:
    import torch

    model, pre = _lite0()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train, _, valid, _ = _paths()
    paths = train + valid
    started = time.perf_counter()
    with torch.inference_mode():
        for x in _batches(paths, pre):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": len(paths), "img_per_s": len(paths) / seconds}


def row_floor_naive() -> dict:
    return _torch_pass(channels_last=False, bf16=False)


def row_floor_channels_last() -> dict:
    return _torch_pass(channels_last=True, bf16=False)


def row_floor_channels_last_bf16() -> dict:
    return _torch_pass(channels_last=True, bf16=True)


def _lite0_session():
    """(onnxruntime session of the pooled Lite0 trunk, preprocessing): the fastest engine of this machine."""
    import onnxruntime as ort
    import torch

    model, pre = _lite0()
    onnx_path = Path(tempfile.mkdtemp()) / "lite0.onnx"
    torch.onnx.export(
        model, torch.zeros(1, 3, SIZE, SIZE), str(onnx_path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}}, dynamo=False,
    )
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]), pre


def row_floor_onnxruntime() -> dict:
    import numpy as np

    session, pre = _lite0_session()
    train, _, valid, _ = _paths()
    paths = train + valid
    started = time.perf_counter()
    for x in _batches(paths, pre):
        session.run(None, {"x": np.ascontiguousarray(x.numpy())})
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": len(paths), "img_per_s": len(paths) / seconds}


def row_linear_probe() -> dict:
    """The strongest fair probe: frozen pooled features extracted on the fastest engine visiontune uses
    (onnxruntime, the same export as the floor row), then scikit-learn's LogisticRegressionCV choosing its
    regularisation by 5-fold cross-validation on the training images only (never the validation images), its
    folds on every core (its fastest setting)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    session, pre = _lite0_session()
    train, y_train, valid, y_valid = _paths()

    def features(paths):
        return np.concatenate([session.run(None, {"x": np.ascontiguousarray(x.numpy())})[0] for x in _batches(paths, pre)])

    scaler = StandardScaler().fit(x_train := features(train))
    probe = LogisticRegressionCV(Cs=10, cv=5, max_iter=2000, n_jobs=-1).fit(scaler.transform(x_train), y_train)
    return {"accuracy": float(probe.score(scaler.transform(features(valid)), y_valid)), "C": float(probe.C_[0]),
            "engine": "onnxruntime", "selection": "LogisticRegressionCV, 5-fold CV on the training images, n_jobs=-1"}


def _fastai(lr_find: bool, epochs: int) -> dict:
    import torch
    from fastai.vision.all import (
        ImageDataLoaders,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        vision_learner,
    )

    from visiontune.backbones.providers import PACKAGED, lukemelas_to_timm, read_state_dict

    torch.manual_seed(0)
    dls = ImageDataLoaders.from_folder(
        DATA, train="train", valid="valid", item_tfms=Resize(SIZE), bs=BATCH,
        batch_tfms=[*aug_transforms(size=SIZE), Normalize.from_stats([0.5] * 3, [0.5] * 3)],
    )
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, metrics=accuracy)
    body = learn.model[0].model
    state = lukemelas_to_timm(read_state_dict(PACKAGED["tf_efficientnet_lite0"].path()), body)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    result = {}
    if lr_find:
        suggestion = learn.lr_find(show_plot=False)
        result["lr"] = float(suggestion.valley)
        learn.fine_tune(epochs, base_lr=result["lr"])
    else:
        learn.fine_tune(epochs)
    result["accuracy"] = float(learn.validate()[1])
    return result


def row_fastai_fine_tune3() -> dict:
    return _fastai(lr_find=False, epochs=3)


def row_fastai_lr_find_fine_tune6() -> dict:
    return _fastai(lr_find=True, epochs=6)


ROWS = {name[4:]: fn for name, fn in globals().items() if name.startswith("row_")}


# ------------------------------------------------------------------------------------------- driver
def run_row(name: str) -> dict:
    """Run one row in a fresh process; returns its JSON result plus the process wall time."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--row", name], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"row {name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    print(f"{name:32s} {json.dumps(result)}", flush=True)
    return result


def run_visiontune(label: str, *extra: str) -> dict:
    """`visiontune train` in a fresh process with an empty feature cache (caching is part of the cost)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VISIONTUNE_CACHE": str(Path(tmp) / "cache")}
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "visiontune.cli", "train", str(DATA), "--out", str(Path(tmp) / "run"), *extra],
            capture_output=True, text=True, env=env,
        )
        wall = time.perf_counter() - started
        if out.returncode != 0 and "cannot be met" in out.stderr:  # a budget this machine cannot meet today
            refusal = " ".join(out.stderr.split())
            print(f"{label:32s} refused: {refusal}", flush=True)
            return {"refused": refusal, "wall_seconds": wall, "args": " ".join(extra)}
        if out.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{out.stderr[-3000:]}")
        meta = json.loads((Path(tmp) / "run" / "classifier" / "classifier.json").read_text())
        plan = json.loads((Path(tmp) / "run" / "plan.json").read_text())
    result = {
        "accuracy": meta["metrics"]["accuracy"],
        "wall_seconds": wall,
        "args": " ".join(extra),
        "plan": {k: plan.get(k) for k in ("cut", "views", "epochs", "img_size", "engine")},
    }
    if plan.get("budget_s"):
        result["budget_s"] = plan["budget_s"]
        result["predicted_s"] = plan.get("predicted_s")
    print(f"{label:32s} {json.dumps(result)}", flush=True)
    return result


def save(results: dict) -> None:
    """Write what is measured so far: a failing later row never loses earlier ones."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fmnist_speed.json").write_text(json.dumps(results, indent=2))


def ensure_data() -> None:
    if (DATA / "train").is_dir():
        return
    from visiontune.data.demo import export_fashion_mnist

    export_fashion_mnist(DATA, train_per_class=200, valid_per_class=200, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", choices=sorted(ROWS), help="(internal) run one row and print its JSON")
    parser.add_argument("--skip-fastai", action="store_true")
    args = parser.parse_args()
    if args.row:
        print(json.dumps(ROWS[args.row]()))
        return

    ensure_data()
    results: dict = {"machine": {"cpus": os.cpu_count()}, "data": "fashion-mnist 2000 train / 2000 valid, 112 px"}
    floors = {name: run_row(name) for name in ROWS if name.startswith("floor_")}
    naive = floors["floor_naive"]["seconds"]
    best_name = min(floors, key=lambda n: floors[n]["seconds"])
    results["floors"] = floors
    results["naive_floor_s"], results["best_floor_s"], results["best_floor_engine"] = naive, floors[best_name]["seconds"], best_name
    peers = results["peers"] = {"linear_probe": run_row("linear_probe")}
    save(results)
    if not args.skip_fastai:
        peers["fastai_fine_tune3"] = run_row("fastai_fine_tune3")
        save(results)
        peers["fastai_lr_find_fine_tune6"] = run_row("fastai_lr_find_fine_tune6")
        save(results)
    ours = results["visiontune"] = {"visiontune_default": run_visiontune("visiontune_default")}
    ours["visiontune_112px"] = run_visiontune("visiontune_112px", "--img-size", str(SIZE))
    save(results)
    for factor in (1.2, 2, 4, 8):
        budget = round(naive * factor)
        ours[f"visiontune_budget_{factor}x"] = run_visiontune(f"visiontune_budget_{factor}x", "--budget", f"{budget}s")
        save(results)
    from report import write_markdown_and_plot  # bench/report.py

    write_markdown_and_plot(results, RESULTS / "fmnist_speed.md", RESULTS / "fmnist_speed.png")


if __name__ == "__main__":
    main()
