"""Markdown table, goal checks and the accuracy-vs-time plot for bench/fmnist_speed.py results."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(results: dict) -> list[tuple[str, float, float | None]]:
    rows = [(name, r["wall_seconds"], r.get("accuracy")) for name, r in results["peers"].items()]
    rows += [(name, r["wall_seconds"], r.get("accuracy")) for name, r in results["visiontune"].items()]
    return rows


def goals(results: dict) -> list[tuple[str, bool, str]]:
    """Each goal of issue B: (goal, met, measured numbers)."""
    ours, peers = results["visiontune"], results["peers"]
    checks = []
    default = ours["visiontune_default"]
    if "fastai_fine_tune3" in peers:
        limit = peers["fastai_fine_tune3"]["wall_seconds"] / 3
        checks.append((
            "default train: accuracy >= 0.90 in <= 1/3 of fastai fine_tune(3) time",
            default["accuracy"] >= 0.90 and default["wall_seconds"] <= limit,
            f"{default['accuracy']:.4f} in {default['wall_seconds']:.1f}s (limit {limit:.1f}s)",
        ))
    best = results["best_floor_s"]
    checks.append((
        "default train in <= 4x the best floor",
        default["wall_seconds"] <= 4 * best,
        f"{default['wall_seconds']:.1f}s vs 4 x {best:.1f}s = {4 * best:.1f}s",
    ))
    for name, run in ours.items():
        if "budget_s" in run:
            error = run["wall_seconds"] / run["budget_s"] - 1
            checks.append((f"{name}: finishes within +-15% of its budget", abs(error) <= 0.15,
                           f"{run['wall_seconds']:.1f}s for {run['budget_s']:.0f}s ({error:+.0%})"))
    budgets = sorted({r["budget_s"] for r in ours.values() if "budget_s" in r} | {600.0})
    for budget in budgets:
        ours_in = [r["accuracy"] for r in ours.values() if r["wall_seconds"] <= budget and "accuracy" in r]
        peers_in = {n: r["accuracy"] for n, r in peers.items() if r["wall_seconds"] <= budget and r.get("accuracy")}
        if peers_in:
            best_ours = max(ours_in) if ours_in else 0.0
            checks.append((f"within {budget:.0f}s: best visiontune run >= every peer that finished",
                           best_ours >= max(peers_in.values()),
                           f"ours {best_ours:.4f} vs peers {json.dumps({k: round(v, 4) for k, v in peers_in.items()})}"))
    return checks


def write_markdown_and_plot(results: dict, md_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    naive, best = results["naive_floor_s"], results["best_floor_s"]
    lines = [
        "| row | accuracy | wall s | x naive floor | x best floor |",
        "|---|---|---|---|---|",
    ]
    for name, seconds, accuracy in _rows(results):
        acc = f"{accuracy:.4f}" if accuracy is not None else "-"
        lines.append(f"| {name} | {acc} | {seconds:.1f} | {seconds / naive:.2f} | {seconds / best:.2f} |")
    lines += ["", "| floor (one pass, 4,000 images, decode included) | seconds | img/s |", "|---|---|---|"]
    for name, floor in results["floors"].items():
        lines.append(f"| {name} | {floor['seconds']:.1f} | {floor['img_per_s']:.0f} |")
    refused = {name: r["refused"] for name, r in results["visiontune"].items() if "refused" in r}
    if refused:
        lines += [""] + [f"- {name}: refused by visiontune in this sitting — {text}" for name, text in refused.items()]
    lines += ["", "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {goal} | {'yes' if ok else '**no**'} | {measured} |" for goal, ok, measured in goals(results)]
    md_path.write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, seconds, accuracy in _rows(results):
        if accuracy is None:
            continue
        ours = name.startswith("visiontune")
        ax.scatter(seconds, accuracy, marker="o" if ours else "s", color="tab:blue" if ours else "tab:red")
        ax.annotate(name.replace("visiontune_", "vt "), (seconds, accuracy), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ours_sorted = sorted((r["wall_seconds"], r["accuracy"]) for r in results["visiontune"].values() if "accuracy" in r)
    ax.plot(*zip(*ours_sorted), color="tab:blue", alpha=0.4)
    ax.axvline(naive, color="gray", linestyle=":", label=f"naive floor {naive:.0f}s")
    ax.axvline(best, color="gray", linestyle="--", label=f"best floor {best:.0f}s")
    ax.set_xscale("log")
    ax.set_xlabel("wall-clock seconds (2-core CPU, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Fashion-MNIST 2k/2k, tf_efficientnet_lite0, 112 px")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    write_markdown_and_plot(data, Path(sys.argv[1]).with_suffix(".md"), Path(sys.argv[1]).with_suffix(".png"))
