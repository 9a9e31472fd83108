"""One process against two (torchrun, gloo) on this machine, with the cores split between them.

The same `train` command on Fashion-MNIST (2,000 train / 2,000 valid images, bench/.data/fmnist-2k),
same seed, each time in a fresh feature cache:

    visiontune train fmnist-2k --unfreeze 2 --head linear --no-report --seed 0 [--nproc 2]

One process uses every core (torch's and onnxruntime's default threads); `--nproc 2` starts torchrun with
two processes of cores/2 threads each. Measured from the run folder: caching (timings.json: hashing, the
trunk pass over 4,000 images, writing shards, the barrier), the cached phase and fine-tuning (the epochs'
seconds in metrics.jsonl, validation included), the whole command's wall time, and validation accuracy.

Goal (issue G): the speedup of caching and of fine-tuning, and accuracy parity (same seed: within 0.5 pt).

    .venv/bin/python bench/distributed.py            # ~8 min on 2 cores; bench/results/distributed.json/.md
    .venv/bin/python bench/distributed.py --repeats 2
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
TRAIN = ["--unfreeze", "2", "--head", "linear", "--no-report", "--seed", "0"]


def run(processes: int, tmp: Path, tag: str) -> dict:
    """One `train` in a fresh cache; its stage times and accuracy."""
    out, cache = tmp / f"run-{tag}", tmp / f"cache-{tag}"
    env = {**os.environ, "VISIONTUNE_CACHE": str(cache)}
    command = [sys.executable, "-m", "visiontune", "train", str(DATA), "--out", str(out), *TRAIN]
    if processes > 1:
        command += ["--nproc", str(processes)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    final = next(r for r in records if r["phase"] == "final")
    return {
        "processes": processes,
        "caching_s": json.loads((out / "timings.json").read_text())["caching_s"],
        "cached_phase_s": round(sum(r["seconds"] for r in records if r["phase"].startswith("cached")), 1),
        "finetune_s": round(sum(r["seconds"] for r in records if r["phase"] == "finetune"), 1),
        "wall_s": round(wall, 1),
        "accuracy": final["accuracy"],
    }


def report(rows: list[dict]) -> str:
    def mean(processes: int, key: str) -> float:
        values = [r[key] for r in rows if r["processes"] == processes]
        return sum(values) / len(values)

    lines = ["| stage | 1 process (2 threads) | 2 processes (1 thread each) | speedup |", "|---|---|---|---|"]
    for key, name in (("caching_s", "caching 4,000 images (s)"), ("cached_phase_s", "cached phase, 10 epochs (s)"),
                      ("finetune_s", "fine-tuning, 2 epochs (s)"), ("wall_s", "whole command (s)")):
        one, two = mean(1, key), mean(2, key)
        lines.append(f"| {name} | {one:.1f} | {two:.1f} | {one / two:.2f}x |")
    one, two = mean(1, "accuracy"), mean(2, "accuracy")
    lines.append(f"| validation accuracy | {one:.4f} | {two:.4f} | {100 * (two - one):+.2f} pt |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="alternate 1 and 2 processes this many times")
    args = parser.parse_args()
    if not DATA.exists():
        sys.path.insert(0, str(ROOT))
        from fmnist_speed import ensure_data

        ensure_data()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for repeat in range(args.repeats):
            for processes in (1, 2):
                rows.append(run(processes, Path(tmp), f"{processes}-{repeat}"))
                print(json.dumps(rows[-1]), flush=True)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "distributed.json").write_text(json.dumps(
        {"command": "visiontune train fmnist-2k " + " ".join(TRAIN) + " [--nproc 2]", "cpus": os.cpu_count(),
         "date": time.strftime("%Y-%m-%d"), "runs": rows}, indent=2))
    text = report(rows)
    (ROOT / "results" / "distributed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
