"""CPU predict throughput and latency, and a load test of the server — lite0 at 224 px on 2 cores.

Rows, all on the same 2,000 Fashion-MNIST PNG files and the same weights (lite0 with a 10-class head):
* visiontune default `predict` path (engine auto = onnxruntime), decode included: one streaming call over
  640 files at batch 32 (what `visiontune predict DIR` does), and warm single-image calls;
* visiontune's PyTorch path (engine torch);
* plain onnxruntime on the file `visiontune export` writes (default session options): model only, and with
  in-process PIL decode; model only at its best batch size (1..32 tried in each round: this CPU runs small
  batches faster); and model only on visiontune's engine (one single-threaded session per core, sharing each
  batch: inference/engines.py OnnxRuntimeForward);
* fastai `get_preds` at its best `num_workers` (0, 1 and 2 tried in each round) and `learn.predict`, on a
  Learner holding the same model.
Throughput rows: each in a fresh process, median of 5 interleaved rounds; a peer's "best" is the best of its
settings within each round, so the peer is compared at its best.
(The server's load test is bench/serve_load.py.)

    .venv/bin/python bench/predict_speed.py     # ~20 min; writes bench/results/predict_speed.json/.md
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_speed import DATA, RESULTS, ensure_data  # noqa: E402

SIZE = 224
N_BATCH = 640  # images for the batch-32 throughput rows
N_SINGLE = 100  # images for single-image latency
ROUNDS = 5  # interleaved rounds of the batch-32 rows


def make_classifier(tmp: Path):
    from visiontune.backbones.registry import create_backbone
    from visiontune.classifier import Classifier

    backbone = create_backbone("tf_efficientnet_lite0", num_classes=10, img_size=SIZE)
    classes = sorted(p.name for p in (DATA / "valid").iterdir())
    clf = Classifier(backbone.model.eval(), backbone.arch, classes, backbone.preprocessing)
    clf.save(tmp / "classifier")
    return Classifier.load(tmp / "classifier")


def throughput(fn, items, batch) -> float:
    fn(items[:batch])  # warm
    started = time.perf_counter()
    for start in range(0, len(items), batch):
        fn(items[start : start + batch])
    return len(items) / (time.perf_counter() - started)


def latency_ms(fn, items) -> float:
    for item in items[:5]:
        fn([item])
    times = []
    for item in items:
        started = time.perf_counter()
        fn([item])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


BATCH_ROWS = (
    "visiontune predict (engine auto)",
    "visiontune predict (engine torch)",
    "plain onnxruntime (model only)",
    "plain onnxruntime (PIL decode in process)",
    "plain onnxruntime (model only, best batch)",
    "onnxruntime model only, visiontune's engine",
    "fastai get_preds (best num_workers)",
)
ORT_BATCHES = (1, 2, 4, 8, 16, 32)
FASTAI_WORKERS = (0, 1, 2)


def bench_paths() -> list[Path]:
    paths = sorted((DATA / "valid").rglob("*.png"))
    rng = np.random.default_rng(0)
    return [paths[i] for i in rng.permutation(len(paths))]


def measure_row(name: str, classifier_dir: Path, onnx_path: Path) -> float | dict:
    """img/s of one throughput row, warm, in this (fresh) process: only that row's sessions exist here.

    A peer measured at several settings returns {"best": img/s, "by_setting": {...}}."""
    from visiontune.classifier import Classifier
    from visiontune.data.images import load_rgb
    from visiontune.data.transforms import eval_transform
    from visiontune.inference.engines import OnnxRuntimeForward
    from visiontune.export.formats import load_exported

    torch.set_num_threads(2)
    paths = bench_paths()[:N_BATCH]
    if name.startswith("visiontune predict"):
        clf = Classifier.load(classifier_dir)
        engine = "torch" if "torch" in name else "auto"
        clf.probabilities(paths[:64], batch_size=32, engine=engine)  # warm: load the engine
        started = time.perf_counter()
        clf.probabilities(paths, batch_size=32, engine=engine)  # one streaming call, as `predict DIR`
        return N_BATCH / (time.perf_counter() - started)
    if name.startswith("fastai get_preds"):
        return fastai_throughput(Classifier.load(classifier_dir), paths)
    run, _ = load_exported(onnx_path)  # onnxruntime with its default session options
    transform = eval_transform(Classifier.load(classifier_dir).preprocessing)
    if name == "plain onnxruntime (PIL decode in process)":
        return throughput(lambda b: run(torch.stack([transform(load_rgb(p)) for p in b]).numpy()), paths, 32)
    tensors = torch.stack([transform(load_rgb(p)) for p in paths]).numpy()
    if name == "plain onnxruntime (model only)":
        return throughput(run, tensors, 32)
    if name == "plain onnxruntime (model only, best batch)":
        by_batch = {str(b): throughput(run, tensors, b) for b in ORT_BATCHES}
        return {"best": max(by_batch.values()), "by_setting": by_batch}
    forward = OnnxRuntimeForward(onnx_path, SIZE)
    return throughput(lambda x: forward(torch.from_numpy(x)).numpy(), tensors, 32)


def main() -> None:
    if "--row" in sys.argv:  # child: one row, printed as JSON
        name, classifier_dir, onnx_path = sys.argv[sys.argv.index("--row") + 1 :][:3]
        print(json.dumps(measure_row(name, Path(classifier_dir), Path(onnx_path))))
        return
    ensure_data()
    RESULTS.mkdir(exist_ok=True)
    torch.set_num_threads(2)
    paths = bench_paths()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clf = make_classifier(tmp)
        from visiontune.data.images import load_rgb
        from visiontune.data.transforms import eval_transform
        from visiontune.export.formats import export, load_exported

        onnx_path = export(clf, "onnx", tmp / "model.onnx")
        # Batch-32 rows: each measurement in a fresh process (no other row's sessions or threads around),
        # in interleaved rounds that start at a different row each time; the median round is reported,
        # since this machine's speed drifts by +-10 % and more over minutes.
        rounds: dict[str, list] = {name: [] for name in BATCH_ROWS}
        for r in range(ROUNDS):
            for name in BATCH_ROWS[r % len(BATCH_ROWS):] + BATCH_ROWS[: r % len(BATCH_ROWS)]:
                out = subprocess.run([sys.executable, __file__, "--row", name, str(tmp / "classifier"), str(onnx_path)],
                                     capture_output=True, text=True, check=True)
                rounds[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(name, rounds[name][-1], flush=True)
        for name in BATCH_ROWS:
            best = [r["best"] if isinstance(r, dict) else r for r in rounds[name]]
            results[name] = {"batch32_img_per_s": statistics.median(best), "batch32_rounds": rounds[name]}
        print(results, flush=True)
        # single-image latency, warm, in this process
        run, _ = load_exported(onnx_path)
        transform = eval_transform(clf.preprocessing)
        tensors = [transform(load_rgb(p)).numpy() for p in paths[:N_SINGLE]]
        for engine in ("auto", "torch"):
            results[f"visiontune predict (engine {engine})"]["batch1_ms"] = latency_ms(
                lambda b: clf.probabilities(b, batch_size=1, engine=engine), paths[:N_SINGLE])
        results["plain onnxruntime (model only)"]["batch1_ms"] = latency_ms(lambda b: run(np.stack(b)), tensors)
        results["plain onnxruntime (PIL decode in process)"]["batch1_ms"] = latency_ms(
            lambda b: run(torch.stack([transform(load_rgb(p)) for p in b]).numpy()), paths[:N_SINGLE])
        print(results, flush=True)
        results.update(fastai_latency(clf, paths))
    (RESULTS / "predict_speed.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "predict_speed.md").write_text(report(results))
    print(report(results))


def fastai_learner(clf, num_workers: int):
    """A fastai Learner holding the same model, with fastai's own loaders and normalisation."""
    from fastai.vision.all import CrossEntropyLossFlat, ImageDataLoaders, Learner, Normalize, Resize

    dls = ImageDataLoaders.from_folder(DATA, train="train", valid="valid", item_tfms=Resize(SIZE), bs=32,
                                       num_workers=num_workers,
                                       batch_tfms=Normalize.from_stats(clf.preprocessing.mean, clf.preprocessing.std))
    return Learner(dls, clf.model.to(memory_format=torch.contiguous_format), loss_func=CrossEntropyLossFlat())


def fastai_throughput(clf, paths) -> dict:
    """`get_preds` over the batch-32 files at each num_workers; the best is fastai's figure for this round."""
    by_workers = {}
    for workers in FASTAI_WORKERS:
        learn = fastai_learner(clf, workers)
        with learn.no_bar():  # no progress bar: fastai at its quietest
            learn.get_preds(dl=learn.dls.test_dl(paths[:32], bs=32))  # warm
            test = learn.dls.test_dl(paths, bs=32)
            started = time.perf_counter()
            learn.get_preds(dl=test)
        by_workers[str(workers)] = len(paths) / (time.perf_counter() - started)
    return {"best": max(by_workers.values()), "by_setting": by_workers}


def fastai_latency(clf, paths) -> dict:
    """Warm `learn.predict` on one file at a time (num_workers is irrelevant to a single item)."""
    learn = fastai_learner(clf, 0)
    with learn.no_bar():
        for p in paths[:5]:
            learn.predict(p)
        times = []
        for p in paths[:N_SINGLE]:
            started = time.perf_counter()
            learn.predict(p)
            times.append(time.perf_counter() - started)
    clf.model.to(memory_format=torch.channels_last)
    out = {"fastai learn.predict": {"batch1_ms": 1000 * statistics.median(times)}}
    print(out, flush=True)
    return out


def report(results: dict) -> str:
    lines = ["| path | throughput, streaming 640 files (img/s) | batch 1 (ms) |", "|---|---|---|"]
    for name, row in results.items():
        b32 = f"{row['batch32_img_per_s']:.1f}" if "batch32_img_per_s" in row else ""
        b1 = f"{row['batch1_ms']:.1f}" if "batch1_ms" in row else ""
        lines.append(f"| {name} | {b32} | {b1} |")
    ours = results.get("visiontune predict (engine auto)", {}).get("batch32_img_per_s")
    if ours:
        lines.append("")
        for peer in ("plain onnxruntime (model only)", "plain onnxruntime (model only, best batch)",
                     "plain onnxruntime (PIL decode in process)", "fastai get_preds (best num_workers)"):
            if "batch32_img_per_s" in results.get(peer, {}):
                lines.append(f"- visiontune default / {peer}: {ours / results[peer]['batch32_img_per_s']:.2f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
