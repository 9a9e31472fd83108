"""Peak memory of caching: `visiontune cache build` on 10,000 and on 100,000 synthetic image files.

The feature store writes shards as it goes and never holds all activations in memory, so peak RSS
should not grow with the number of images. Each measurement is a fresh process; peak RSS is the
largest of the process and its decoding worker (getrusage of waited-for children).

    .venv/bin/python bench/cache_memory.py            # ~6 min on 2 cores; writes bench/results/cache_memory.json
"""

from __future__ import annotations

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
SIZES = (10_000, 100_000)
IMG_SIZE = 64  # input size for the trunk: the point is memory, not accuracy


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """`count` distinct 32x32 PNG files (distinct bytes, so none share a cache row)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    for i in range(count):
        arr = base.copy()
        arr[0, :4, 0] = np.frombuffer(i.to_bytes(4, "little"), dtype=np.uint8)  # unique content per file
        Image.fromarray(arr).save(folder / f"{i:06d}.png")


def measure(images: Path, cache: Path) -> dict:
    """Run `visiontune cache build` in a wrapper process that reports its children's peak RSS."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:]); "
        "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [
        sys.executable, "-c", wrapper, sys.executable, "-m", "visiontune.cli", "cache", "build", str(images),
        "--cache-dir", str(cache), "--img-size", str(IMG_SIZE),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    code, seconds, max_rss_kb = out.stdout.strip().splitlines()[-1].split()
    if code != "0":
        raise RuntimeError(out.stderr[-2000:])
    return {"seconds": float(seconds), "peak_rss_mb": int(max_rss_kb) / 1024}


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for count in SIZES:
            folder = Path(tmp) / f"images-{count}"
            started = time.perf_counter()
            write_images(folder, count)
            row = measure(folder, Path(tmp) / f"cache-{count}")
            row["write_seconds"] = time.perf_counter() - started - row["seconds"]
            results[str(count)] = row
            print(count, json.dumps(row), flush=True)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "cache_memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
