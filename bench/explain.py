"""What TTA and hard-example up-weighting change on the Fashion-MNIST bench (issue D).

Trains the default plan once, evaluates it on the 2,000 validation images with every TTA mode, then
mines hard training examples and retrains with them drawn 3x as often.

    .venv/bin/python bench/explain.py     # ~5 min; writes bench/results/explain.json/.md
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_speed import DATA, RESULTS, ensure_data  # noqa: E402

import visiontune as vt  # noqa: E402
from visiontune.inference.tta import TTA_MODES  # noqa: E402


def main() -> None:
    ensure_data()
    out: dict = {"tta": {}, "hard_examples": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clf = vt.fit(DATA, out=tmp / "base", report=False)
        for mode in TTA_MODES:
            started = time.perf_counter()
            m = vt.evaluate(clf, DATA, tta=mode)
            out["tta"][mode] = {"accuracy": m["accuracy"], "log_loss": m["log_loss"], "seconds": round(time.perf_counter() - started, 1)}
            print(mode, out["tta"][mode], flush=True)
        found, csv, _ = vt.api.hard_examples(tmp / "base", tmp / "hard.csv")
        kinds = {k: sum(h.kind == k for h in found) for k in ("likely-label-error", "wrong", "barely-right")}
        again = vt.fit(DATA, out=tmp / "upweighted", report=False, upweight=str(csv), upweight_factor=3.0)
        out["hard_examples"] = {"kinds": kinds, "base_accuracy": clf.metrics["accuracy"], "upweighted_accuracy": again.metrics["accuracy"],
                                "base_log_loss": clf.metrics["log_loss"], "upweighted_log_loss": again.metrics["log_loss"]}
        print(out["hard_examples"], flush=True)
    (RESULTS / "explain.json").write_text(json.dumps(out, indent=2))
    lines = ["| TTA | accuracy | log loss | seconds |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.4f} | {v['log_loss']:.4f} | {v['seconds']} |" for k, v in out["tta"].items()]
    h = out["hard_examples"]
    lines += ["", f"Hard examples in training: {h['kinds']}. Retrained with them drawn 3x as often: accuracy "
              f"{h['base_accuracy']:.4f} -> {h['upweighted_accuracy']:.4f}, log loss {h['base_log_loss']:.4f} -> {h['upweighted_log_loss']:.4f}."]
    (RESULTS / "explain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
