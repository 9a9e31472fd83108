"""`make gpu-check`'s script cannot rot: the same rows run here on the CPU, on a tiny Fashion-MNIST subset
(`bench/gpu_check.py --device cpu --quick`), through the same code paths a GPU run takes with `--device cuda`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_the_gpu_check_runs_every_row_on_the_cpu(tmp_path):
    from visiontune.data.demo import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        assert not os.environ.get("VISIONTUNE_REQUIRE_DATA"), "make test needs Fashion-MNIST: make fashion-mnist"
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--work",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"1 limits", "2 train 2k/2k", "2 train full", "4 predict 10k", "4 serve", "2 train 2k/2k fp32",
                         "deterministic 2k/2k twice",
                         "5 peer: plain timm loop (full)", "6 processes", "GPU JPEG decoding"}
    failed = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert not failed, failed
    assert rows["2 train full"]["plan"]["device"] == "cpu" and rows["2 train full"]["finetune"]["epochs"] == 1
    assert rows["4 predict 10k"]["images"] == 40 and rows["4 serve"]["requests"] == 12
    assert 0 <= rows["5 peer: plain timm loop (full)"]["accuracy"] <= 1
    assert "full train vs peer" in result["goals"] and "gpu-check on CPU" in done.stdout
    assert rows["deterministic 2k/2k twice"]["identical"] is True
    assert rows["2 train 2k/2k fp32"]["plan"]["amp"] is False
