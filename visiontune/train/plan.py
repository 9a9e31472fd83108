"""The recipe, chosen from the data the way competition winners choose it, printed with its reasons.

Seed rules (from the practitioners' notes): with little data (< 10k images) train only the classifier on
frozen features, which is also what makes caching pay; with 10k-20k also train the last blocks; with
more, fine-tune everything. Every choice can be overridden, and the plan records which ones were.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rich.table import Table

SMALL_DATA = 10_000
MEDIUM_DATA = 20_000


@dataclass
class Plan:
    """Everything the training loop needs to know, with a reason for each choice."""

    recipe: str  # "head" | "last-blocks" | "full"
    img_size: int
    batch_size: int
    head_epochs: int
    head_lr: float
    head_dropout: float
    weight_decay: float
    finetune_epochs: int
    finetune_lr: float
    unfreeze_groups: int  # layer groups trained in fine-tuning, counted from the top; -1 = all
    bn_freeze: bool  # keep every BatchNorm's running statistics fixed while fine-tuning
    valid_fraction: float
    seed: int
    why: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    def table(self) -> Table:
        """The plan as a rich table with a 'why' column, printed before training."""
        table = Table(title="plan", show_lines=False)
        table.add_column("setting")
        table.add_column("value", justify="right")
        table.add_column("why")
        for f in fields(self):
            if f.name == "why":
                continue
            table.add_row(f.name, str(getattr(self, f.name)), self.why.get(f.name, ""))
        return table


def make_plan(
    n_train: int,
    n_classes: int,
    native_size: int,
    median_side: int | None = None,
    overrides: dict | None = None,
) -> Plan:
    """Choose the recipe from dataset size and image size; `overrides` (non-None values) win."""
    why: dict[str, str] = {}
    if n_train < SMALL_DATA:
        recipe, finetune_epochs, groups = "head", 0, 0
        why["recipe"] = f"{n_train} training images < {SMALL_DATA:,}: train the classifier only on cached features"
    elif n_train < MEDIUM_DATA:
        recipe, finetune_epochs, groups = "last-blocks", 2, 2
        why["recipe"] = f"{n_train} images in {SMALL_DATA:,}-{MEDIUM_DATA:,}: also fine-tune the last blocks"
    else:
        recipe, finetune_epochs, groups = "full", 3, -1
        why["recipe"] = f"{n_train} images >= {MEDIUM_DATA:,}: fine-tune everything after the head"
    why["finetune_epochs"] = "follows the recipe"
    why["unfreeze_groups"] = "follows the recipe (-1 = all)"

    img_size = native_size
    why["img_size"] = "the backbone's native input size"
    if median_side is not None and median_side * 2 <= native_size:
        img_size = min(native_size, 112)
        why["img_size"] = f"source images are small (median side {median_side}px): {img_size}px loses no detail"

    plan = Plan(
        recipe=recipe,
        img_size=img_size,
        batch_size=64,
        head_epochs=30,
        head_lr=1e-2,
        head_dropout=0.2,
        weight_decay=1e-4,
        finetune_epochs=finetune_epochs,
        finetune_lr=1e-3,
        unfreeze_groups=groups,
        bn_freeze=True,
        valid_fraction=0.2,
        seed=0,
        why=why,
    )
    why.setdefault("batch_size", "fits CPU caches; stable statistics")
    why.setdefault("head_epochs", "cheap on cached features; one-cycle schedule")
    why.setdefault("head_lr", "AdamW one-cycle peak for a linear head")
    why.setdefault("head_dropout", "dropout on the head only, never on conv layers")
    why.setdefault("finetune_lr", "peak for the head; the body gets 1/10 (differential)")
    why.setdefault("bn_freeze", "pretrained BN statistics kept: CPU-sized batches give noisy batch statistics")
    why.setdefault("valid_fraction", "stratified hold-out when no valid/ folder is given")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if not hasattr(plan, name) or name == "why":
            raise ValueError(f"unknown plan setting {name!r}")
        setattr(plan, name, type(getattr(plan, name))(value))
        why[name] = "set by you"
    if (overrides or {}).get("finetune_epochs") and plan.recipe == "head":
        plan.recipe = "full" if plan.unfreeze_groups == -1 or plan.unfreeze_groups == 0 else "last-blocks"
        if plan.unfreeze_groups == 0:
            plan.unfreeze_groups = -1
        why["recipe"] = "fine-tuning asked for (--unfreeze)"
    return plan
