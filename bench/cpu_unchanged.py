"""Did a change move the CPU headline? The default `visiontune train` row of bench/fmnist_speed.py, run with
the code of an earlier commit and with this checkout's, interleaved in one sitting.

Each round runs both versions, each in a fresh process with an empty feature cache (as the headline row
does), on the same 2,000 / 2,000 Fashion-MNIST files; the earlier commit's code comes from a git worktree,
put first on PYTHONPATH of the same environment. Recorded per run: validation accuracy, wall-clock seconds
and the SHA-256 of the saved weights (identical digests: the change computed the same model bit for bit).

    .venv/bin/python bench/cpu_unchanged.py 2e9c1cd          # two rounds (~5 min on 2 cores)
Writes bench/results/cpu_unchanged.json and bench/results/cpu_unchanged.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT))
from fmnist_speed import DATA, ensure_data  # noqa: E402  (the headline's data, exported the same way)


def worktree(rev: str) -> tuple[Path, str]:
    """A checkout of `rev` under bench/.worktrees (made once), and its full commit id."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    path = ROOT / ".worktrees" / commit[:12]
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, check=True,
                       capture_output=True)
    return path, commit


def train(code: Path) -> dict:
    """The headline's default row with the code in `code`: accuracy, wall seconds, weights digest."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VISIONTUNE_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(code)}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "visiontune.cli", "train", str(DATA), "--out", str(Path(tmp) / "run")],
                              capture_output=True, text=True, env=env, cwd=tmp)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"train with {code} failed:\n{done.stderr[-3000:]}")
        run = Path(tmp) / "run" / "classifier"
        meta = json.loads((run / "classifier.json").read_text())
        digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
        loaded_from = subprocess.run([sys.executable, "-c", "import visiontune; print(visiontune.__file__)"],
                                     capture_output=True, text=True, env=env, cwd=tmp).stdout.strip()
    assert loaded_from.startswith(str(code)), f"{loaded_from} is not the code under {code}"
    return {"accuracy": meta["metrics"]["accuracy"], "wall_seconds": round(wall, 1), "weights_sha256": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="the earlier commit (e.g. the one before a change)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ensure_data()
    old_code, old_commit = worktree(args.before)
    new_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "visiontune"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip())
    rows: dict[str, list[dict]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        for name, code in (("before", old_code), ("after", REPO)) if round_ % 2 == 0 else (("after", REPO), ("before", old_code)):
            rows[name].append(train(code))
            print(f"round {round_ + 1} {name:6s} {json.dumps(rows[name][-1])}", flush=True)
    same_weights = len({r["weights_sha256"] for r in rows["before"] + rows["after"]}) == 1
    mean = {k: round(sum(r["wall_seconds"] for r in v) / len(v), 1) for k, v in rows.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count()},
              "data": "fashion-mnist 2000 train / 2000 valid (bench/fmnist_speed.py's), default `visiontune train`",
              "before": {"commit": old_commit, "runs": rows["before"]},
              "after": {"commit": new_commit, "uncommitted_changes_in_visiontune": dirty, "runs": rows["after"]},
              "same_weights_in_every_run": same_weights, "mean_wall_seconds": mean,
              "wall_ratio_after_over_before": round(mean["after"] / mean["before"], 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_unchanged.json").write_text(json.dumps(result, indent=2))
    lines = [f"# CPU headline before/after ({result['date']}, {os.cpu_count()} cores)", "",
             f"`bench/cpu_unchanged.py {args.before}`: {old_commit[:10]} (before) vs {new_commit[:10]} (after), "
             f"{args.rounds} interleaved rounds, default `visiontune train` on the headline's 2,000 / 2,000 files.", "",
             "| code | accuracy | wall s | weights sha256 |", "|---|---|---|---|"]
    for name in ("before", "after"):
        for r in rows[name]:
            lines.append(f"| {name} | {r['accuracy']:.4f} | {r['wall_seconds']} | {r['weights_sha256'][:16]} |")
    lines += ["", f"Same weights in every run: **{same_weights}**; mean wall {mean['before']} s before, {mean['after']} s "
                  f"after (x{result['wall_ratio_after_over_before']})."]
    (RESULTS / "cpu_unchanged.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
