"""Figures, drawn with matplotlib's headless Agg backend and saved as PNG (to a path or a file object)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


Target = Path | BinaryIO


def _save(fig, path: Target) -> Target:
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_curves(records: list[dict], path: Target) -> Target:
    """Training and validation loss, validation accuracy, per phase, over the phase's epochs."""
    phases = [p for p in dict.fromkeys(r["phase"] for r in records) if p != "final"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for phase in phases:
        epochs = [r for r in records if r["phase"] == phase and "train_loss" in r]
        steps = [r for r in records if r["phase"] == phase and r.get("kind") == "step"]
        if epochs:
            x = [r["epoch"] for r in epochs]
            axes[0].plot(x, [r["train_loss"] for r in epochs], marker="o", label=f"{phase} train")
            if "valid_loss" in epochs[0]:
                axes[0].plot(x, [r["valid_loss"] for r in epochs], marker="o", label=f"{phase} valid")
                axes[1].plot(x, [r["valid_accuracy"] for r in epochs], marker="o", label=phase)
        if steps:
            axes[1].plot([r["epoch"] for r in steps], [r["valid_accuracy"] for r in steps], alpha=0.5, label=f"{phase} (every N steps)")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in axes:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_lr_schedule(records: list[dict], path: Target) -> Target:
    """The head's learning rate at each logged point, per phase."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for phase in dict.fromkeys(r["phase"] for r in records):
        points = [r for r in records if r["phase"] == phase and "lr" in r and "step" in r]
        if points:
            ax.plot([r["step"] for r in points], [r["lr"] for r in points], marker=".", label=phase)
    ax.set(xlabel="optimizer step", ylabel="learning rate (head)", title="learning rate")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_confusion(matrix: list[list[float]], classes: list[str], path: Target, normalized: bool = False) -> Target:
    m = np.asarray(matrix, dtype=float)
    size = max(4, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                text = f"{m[i, j]:.2f}" if normalized else f"{int(m[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix" + (" (row-normalised)" if normalized else ""))
    return _save(fig, path)


def plot_roc_pr(curves: dict, path: Target) -> Target:
    """One-vs-rest ROC and precision-recall curves per class."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves["roc"].items():
        axes[0].plot(c["fpr"], c["tpr"], label=f"{name} ({c['auc']:.3f})")
    axes[0].plot([0, 1], [0, 1], "k--", linewidth=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (AUC)")
    for name, c in curves["pr"].items():
        axes[1].plot(c["recall"], c["precision"], label=f"{name} ({c['ap']:.3f})")
    axes[1].set(xlabel="recall", ylabel="precision", title="precision-recall (AP)")
    for ax in axes:
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_reliability(reliability: dict, ece: float, path: Target) -> Target:
    """Reliability diagram: accuracy vs confidence per bin, bar width = bin, diagonal = calibrated."""
    edges = np.asarray(reliability["edges"])
    counts = np.asarray(reliability["count"])
    acc = np.asarray(reliability["accuracy"])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    ax.bar(centres[counts > 0], acc[counts > 0], width=width * 0.95, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfectly calibrated")
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", title=f"reliability (ECE {ece:.3f})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_class_distribution(counts: dict[str, dict[str, int]], path: Target) -> Target:
    """Images per class in each part (train/valid)."""
    parts = list(counts)
    classes = list(next(iter(counts.values())))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(classes) + 2), 3.5))
    width = 0.8 / max(len(parts), 1)
    for k, part in enumerate(parts):
        ax.bar(np.arange(len(classes)) + k * width, [counts[part][c] for c in classes], width=width, label=part)
    ax.set_xticks(np.arange(len(classes)) + width * (len(parts) - 1) / 2, classes, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="images", title="class distribution")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_bars(values: dict[str, float], path: Target, title: str, xlabel: str) -> Target:
    """Horizontal bars, e.g. the fraction of zero activations per layer."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.18 * len(names) + 1)))
    ax.barh(range(len(names)), [values[n] for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title, xlim=(0, 1))
    return _save(fig, path)


def plot_lr_find(result, path: Path) -> Path:
    """Loss vs learning rate (log scale), raw and smoothed, with the suggestion marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, alpha=0.3, label="batch loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed")
    ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested {result.suggestion:.2g}")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if np.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 3 * min(finite)) * 1.1)
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR finder — {result.rule}", fontsize=9)
    ax.legend()
    return _save(fig, path)


def image_grid(
    rows: list[list[np.ndarray]], path: Target, row_titles: list[str] | None = None, title: str = "",
    tile_titles: list[list[str]] | None = None, cmap: str | None = None,
) -> Target:
    """A grid of images (HxWx3 uint8, or HxW arrays drawn with `cmap`), one list per row, optional titles."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols, 1.8 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c], cmap=cmap)
                if tile_titles and c < len(tile_titles[r]):
                    ax.set_title(tile_titles[r][c], fontsize=6)
        if row_titles:
            axes[r][0].set_title(row_titles[r], fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_domains(before: dict, after: dict, path: Target) -> Target:
    """Source vs target features in 2-D (PCA of each), before and after adaptation, with the proxy A-distance."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (title, picture) in zip(axes, (("before (pretrained features)", before), ("after adaptation", after))):
        for domain, colour in (("source", "tab:blue"), ("target", "tab:orange")):
            points = np.asarray(picture["scatter"][domain])
            if len(points):
                ax.scatter(points[:, 0], points[:, 1], s=5, alpha=0.5, c=colour, label=domain)
        ax.set(title=f"{title}\nproxy A-distance {picture['proxy_a_distance']:.2f}", xticks=[], yticks=[])
        ax.legend(loc="best", fontsize=7)
    return _save(fig, path)


def plot_series(series: dict[str, list[float]], path: Target, title: str, ylabel: str) -> Target:
    """Lines over epochs (e.g. the fraction of unlabelled images given a pseudo-label)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set(xlabel="epoch of the unlabelled phase", ylabel=ylabel, title=title, ylim=(0, 1.02))
    ax.legend(fontsize=7)
    return _save(fig, path)
