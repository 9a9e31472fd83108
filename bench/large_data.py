"""A 10,000- and a 100,000-image folder through every stage: peak memory must not grow with the folder.

Synthetic 32x32 PNG files (distinct bytes) in 10 class folders. For each size, each command runs in a
fresh process and its peak RSS is measured (getrusage of the waited-for children, so decoding workers
count too):

* the catalog (`discover(DATA)`: listing and header-checking every file, in threads) twice: cold, then
  warm (the header-check record: unchanged files are not read again);
* `train DATA --cut pooled --epochs 2 --unfreeze 0 --head linear --img-size 64`: catalog, caching,
  training, evaluation, leakage checks and the report — a cheap plan on purpose: the point is memory;
* `predict RUN DATA --csv`: prediction over every file, streamed.

Goal (issue G): each command's peak RSS at 100k within 5 % of 10k, and under 2 GB.

    .venv/bin/python bench/large_data.py          # ~25 min on 2 cores; writes bench/results/large_data.json/.md
    .venv/bin/python bench/large_data.py --sizes 2000 10000    # a quicker look
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

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
CLASSES = 10
TRAIN = ["--cut", "pooled", "--epochs", "2", "--unfreeze", "0", "--head", "linear", "--img-size", "64"]


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """`count` distinct 32x32 PNG files spread over `CLASSES` class folders (class = a colour tint)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(32, 32, 3), dtype=np.uint8)
    for c in range(CLASSES):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        c = i % CLASSES
        arr = base.copy()
        arr[..., c % 3] = np.clip(arr[..., c % 3].astype(int) + 20 * (c // 3 + 1), 0, 255).astype(np.uint8)
        arr[0, :4, 0] = np.frombuffer(i.to_bytes(4, "little"), dtype=np.uint8)  # unique content per file
        Image.fromarray(arr).save(folder / f"class{c}" / f"{i:06d}.png")


CATALOG = "import sys; from visiontune.data.catalog import discover; print(len(discover(sys.argv[1]).train))"


def measured(*args: str, env: dict, python: str | None = None) -> dict:
    """`visiontune ARGS` (or `python -c PYTHON ARGS`) in a wrapper process that reports its wall time and peak RSS."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
               "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = ["-c", python] if python else ["-m", "visiontune.cli"]
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *command, *args],
                         capture_output=True, text=True, env=env)
    code, seconds, max_rss_kb = out.stdout.strip().splitlines()[-1].split()
    if code != "0":
        raise RuntimeError(f"visiontune {' '.join(args)} failed: {out.stderr[-3000:]}")
    return {"seconds": round(float(seconds), 1), "peak_rss_mb": round(int(max_rss_kb) / 1024, 1)}


def run_size(tmp: Path, count: int) -> dict:
    data, run, cache = tmp / f"images-{count}", tmp / f"run-{count}", tmp / f"cache-{count}"
    started = time.perf_counter()
    write_images(data, count)
    env = {**os.environ, "VISIONTUNE_CACHE": str(cache)}
    row = {"write_seconds": round(time.perf_counter() - started, 1)}
    row["catalog, cold (list + check every file)"] = measured(str(data), env=env, python=CATALOG)
    row["catalog, warm (unchanged files not re-read)"] = measured(str(data), env=env, python=CATALOG)
    row["train (cache, train, evaluate, report)"] = measured("train", str(data), "--out", str(run), *TRAIN, env=env)
    row["predict (every file, CSV)"] = measured("predict", str(run), str(data), "--csv", str(tmp / f"p-{count}.csv"), env=env)
    return row


def report(results: dict) -> str:
    sizes = list(results)
    stages = [k for k in results[sizes[0]] if k != "write_seconds"]
    lines = ["| stage | " + " | ".join(f"{int(s):,} images: time, peak RSS" for s in sizes) + " | growth |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for stage in stages:
        cells = [f"{results[s][stage]['seconds']:.1f} s, {results[s][stage]['peak_rss_mb']:.0f} MB" for s in sizes]
        growth = results[sizes[-1]][stage]["peak_rss_mb"] / results[sizes[0]][stage]["peak_rss_mb"] - 1
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {growth:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for count in args.sizes:
            results[str(count)] = run_size(Path(tmp), count)
            print(count, json.dumps(results[str(count)]), flush=True)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "large_data.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (ROOT / "results" / "large_data.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
