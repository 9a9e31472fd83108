"""Which playbook tricks move accuracy or time: one `visiontune train` per trick on the Fashion-MNIST bench.

Same data as fmnist_speed.py (2,000 train / 2,000 valid PNGs, lite0, 112 px). Every row is a fresh process
sharing one feature cache, warmed by the first (default) row, so the rows compare training, not caching;
`train_s` is the run's own training time (metrics `seconds`), `wall_s` the whole process.

    .venv/bin/python bench/playbook.py            # ~15 min on 2 cores
Writes bench/results/playbook.json and bench/results/playbook.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_speed import DATA, RESULTS, ensure_data  # noqa: E402

ROWS = [
    ("default plan", []),
    ("--lr auto (LR finder)", ["--lr", "auto"]),
    ("--schedule cosine --warmup-epochs 1", ["--schedule", "cosine", "--warmup-epochs", "1"]),
    ("--schedule sgdr --sgdr-cycle 2", ["--schedule", "sgdr", "--sgdr-cycle", "2", "--sgdr-mult", "2"]),
    ("--optimizer sgd --lr 0.05", ["--optimizer", "sgd", "--lr", "0.05"]),
    ("--lr-mult 1 (no discriminative LR)", ["--lr-mult", "1"]),
    ("--no-bn-freeze", ["--no-bn-freeze"]),
    ("--head-dropout 0", ["--head-dropout", "0"]),
    ("--head-init xavier", ["--head-init", "xavier"]),
    ("--head-init kaiming", ["--head-init", "kaiming"]),
    ("--head logreg (closed-form probe head)", ["--head", "logreg"]),
    ("--head mlp", ["--head", "mlp"]),
    ("--label-smoothing 0.1", ["--label-smoothing", "0.1"]),
    ("--loss focal", ["--loss", "focal"]),
    ("--mixup 0.2", ["--mixup", "0.2"]),
    ("--cutmix 1.0", ["--cutmix", "1.0"]),
    ("--swa", ["--swa"]),
    ("--ema 0.99", ["--ema", "0.99"]),
    ("--epochs 30 --early-stop 3", ["--epochs", "30", "--early-stop", "3"]),
    ("--amp (bf16 autocast)", ["--amp"]),
    ("--views 2", ["--views", "2"]),
    ("--views 2 --aug standard", ["--views", "2", "--aug", "standard"]),
    ("--views 2 --aug standard --mixup 0.2 --swa", ["--views", "2", "--aug", "standard", "--mixup", "0.2", "--swa"]),
    ("--batch-size auto", ["--batch-size", "auto"]),
    ("--unfreeze 1 (fine-tune on images)", ["--unfreeze", "1"]),
    ("--unfreeze 1 --amp", ["--unfreeze", "1", "--amp"]),
]


def run(label: str, extra: list[str], cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "visiontune.cli", "train", str(DATA), "--out", f"{tmp}/run", *extra],
            capture_output=True, text=True, env={**os.environ, "VISIONTUNE_CACHE": str(cache)},
        )
        wall = time.perf_counter() - started
        if out.returncode != 0:
            return {"label": label, "args": " ".join(extra), "error": out.stderr[-500:]}
        metrics = json.loads(Path(f"{tmp}/run/classifier/classifier.json").read_text())["metrics"]
    row = {"label": label, "args": " ".join(extra), "accuracy": metrics["accuracy"], "log_loss": metrics["log_loss"],
           "train_s": metrics["seconds"], "wall_s": round(wall, 1)}
    print(json.dumps(row), flush=True)
    return row


def report(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| trick | accuracy | Δ accuracy | log loss | train s | time |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| `{row['label']}` | failed | | | |")
            continue
        lines.append(
            f"| `{row['label']}` | {row['accuracy']:.4f} | {row['accuracy'] - base['accuracy']:+.4f} | "
            f"{row['log_loss']:.3f} | {row['train_s']:.1f} | {row['train_s'] / base['train_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if "--report" in sys.argv:  # re-render the table from the saved rows
        rows = json.loads((RESULTS / "playbook.json").read_text())
        (RESULTS / "playbook.md").write_text(report(rows))
        print(report(rows))
        return
    ensure_data()
    RESULTS.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        run("warm the cache", ["--epochs", "1", "--views", "2"], Path(cache))
        run("warm the cache (standard views)", ["--epochs", "1", "--views", "2", "--aug", "standard"], Path(cache))
        for label, extra in ROWS:
            rows.append(run(label, extra, Path(cache)))
            (RESULTS / "playbook.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "playbook.md").write_text(report(rows))
    print(report(rows))


if __name__ == "__main__":
    main()
