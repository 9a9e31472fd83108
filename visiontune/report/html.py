"""One self-contained HTML report per run: every figure inlined as a PNG data URI, no script, no network.

Built from what the run saved (plan.json, metrics.jsonl, split.json, predictions.npz and the classifier),
so `visiontune report RUN` can rebuild it at any time; only the few images it shows are decoded.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from visiontune.classifier import Classifier
from visiontune.evaluation.interpret import interpret
from visiontune.evaluation.metrics import classification_metrics, curves
from visiontune.evaluation.visualize import dead_activation_fractions, feature_maps, kernel_tiles
from visiontune.report import plots
from visiontune.report.multilabel import MULTILABEL_SECTIONS, multilabel_sections
from visiontune.report.parts import (
    class_counts,
    examples_grid,
    figure_html,
    gradcam_section,
    preprocessed_image,
    table_html,
    valid_predictions,
)
from visiontune.runs import RunDir
from visiontune.train.plan import PLAYBOOK_SETTINGS

SECTIONS = {
    "summary": "Summary",
    "plan": "Plan",
    "data": "Data",
    "training": "Training curves",
    "metrics": "Metrics",
    "confusion": "Confusion",
    "curves": "ROC and precision-recall",
    "calibration": "Calibration",
    "interpretation": "Interpretation",
    "gradcam": "Grad-CAM",
    "network": "Inside the network",
}


def build_report(run_dir: str | Path, screenshot: bool = False) -> Path:
    """Write runs/NAME/report.html (and interpretation.json) from the run's saved outputs."""
    run = RunDir.open(run_dir)
    classifier = Classifier.load(run.path)
    data = valid_predictions(run, classifier)
    records = run.read_metrics()
    plan = run.read_plan().to_dict()
    sections, build = REPORTS[classifier.task.report]
    summary, body = build(run, classifier, data)
    final = next((r for r in reversed(records) if r.get("phase") == "final"), {})
    body["summary"] = table_html(["", ""], summary + [
        ["architecture", classifier.arch], ["classes", len(classifier.classes)], ["training seconds", final.get("seconds", "")]])
    why = plan.get("why", {})
    body["plan"] = table_html(["setting", "value", "why"], [
        [k, v, why.get(k, "")] for k, v in plan.items() if k != "why" and (k not in PLAYBOOK_SETTINGS or k in why)
    ]) + "<p>Playbook settings not listed are at their defaults (README, Recipes).</p>"
    body["training"] = figure_html(plots.plot_curves, records) + figure_html(plots.plot_lr_schedule, records)
    body["network"] = _network_section(classifier, data["paths"])
    beyond = _beyond_section(run, records)
    if beyond:
        sections, body["beyond"] = {**sections, "beyond": "Beyond labels"}, beyond
    return run.write_report(_page(f"visiontune report — {run.path.name}", sections, body))


def _page(title: str, sections: dict[str, str], body: dict[str, str]) -> str:
    nav = " · ".join(f'<a href="#{k}">{v}</a>' for k, v in sections.items())
    parts = "".join(f'<section id="{k}"><h2>{v}</h2>{body[k]}</section>' for k, v in sections.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<link rel="icon" href="data:,">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
section {{ border-top: 1px solid #ddd; padding-top: 0.5em; }}
nav {{ font-size: 0.9em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; margin: 0.5em 0; }}
.tile {{ margin: 0; width: 128px; }}
.tile img {{ width: 128px; height: 128px; margin: 0 0 2px 0; image-rendering: auto; }}
.tile figcaption {{ font-size: 13px; line-height: 1.25; overflow-wrap: anywhere; }}
</style></head>
<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>{parts}</body></html>
"""


def recall_line(metrics: dict, shown: int = 10) -> str:
    """'shirt 0.52, pullover 0.71, ...': each class's recall, the weakest first (what an imbalanced run's
    user looks at before the accuracy), at most `shown` classes."""
    ranked = sorted(metrics["per_class"].items(), key=lambda item: item[1]["recall"])
    text = ", ".join(f"{name} {values['recall']:.2f}" for name, values in ranked[:shown])
    return text + (f", … ({len(ranked) - shown} more)" if len(ranked) > shown else "")


def leakage_rows(run: RunDir) -> list[list]:
    """Summary rows for what `train` found in leakage.json (copies across the split, one image in two
    classes): a reader must see them next to the accuracy they inflate."""
    path = run.file("leakage.json")
    if not path.exists():
        return []
    found = json.loads(path.read_text())
    rows = []
    if found.get("identical_across_split"):
        rows.append(["validation images identical to training images", len(found["identical_across_split"])])
    if found.get("near_across_split"):
        rows.append(["validation images near-duplicates of training images", len(found["near_across_split"])])
    if found.get("conflicting"):
        rows.append(["images in two classes at once (groups)", len(found["conflicting"])])
    return rows


def _single_label_sections(run: RunDir, classifier: Classifier, data: dict) -> tuple[list[list], dict[str, str]]:
    """(summary rows, HTML of the sections particular to a single-label run)."""
    classes = classifier.classes
    probs, labels, paths = data["probs"], data["labels"], data["paths"]
    metrics = classification_metrics(labels, probs, classes)
    roc_pr = curves(labels, probs, classes)
    lists = interpret(probs, labels, k=8)
    run.write_json("interpretation.json", {"paths": paths, "classes": classes, **lists})

    body: dict[str, str] = {}
    summary = [
        ["validation images", metrics["n"]], ["accuracy", f"{metrics['accuracy']:.4f}"],
        ["balanced accuracy", f"{metrics['balanced_accuracy']:.4f}"], ["recall by class, lowest first", recall_line(metrics)],
        ["macro F1", f"{metrics['macro_f1']:.4f}"],
        ["log loss", f"{metrics['log_loss']:.4f}"], ["expected calibration error", f"{metrics['ece']:.4f}"],
    ]
    if "roc_auc" in metrics:
        summary.append(["ROC AUC (one-vs-rest, macro)", f"{metrics['roc_auc']:.4f}"])
    summary += leakage_rows(run)
    body["data"] = figure_html(plots.plot_class_distribution, class_counts(data["split"], classes, "labels"))
    per_class = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]] for c, v in metrics["per_class"].items()]
    averages = [[f"{a} average", f"{metrics[f'{a}_precision']:.3f}", f"{metrics[f'{a}_recall']:.3f}", f"{metrics[f'{a}_f1']:.3f}", metrics["n"]]
                for a in ("macro", "micro", "weighted")]
    topk = [k for k in metrics if k.startswith("top") and k.endswith("_accuracy")]
    body["metrics"] = table_html(["class", "precision", "recall", "F1", "support"], per_class + averages) + (
        f"<p>{html.escape(topk[0])}: {metrics[topk[0]]:.4f}</p>" if topk else "")
    confused = [[classes[t], classes[p], n] for t, p, n in lists["most_confused"]]
    body["confusion"] = (
        figure_html(plots.plot_confusion, metrics["confusion_matrix"], classes)
        + figure_html(plots.plot_confusion, metrics["confusion_matrix_normalized"], classes, normalized=True)
        + "<h3>most confused pairs</h3>" + table_html(["true", "predicted", "images"], confused)
    )
    body["curves"] = figure_html(plots.plot_roc_pr, roc_pr) if roc_pr["roc"] else "<p>needs two classes present</p>"
    body["calibration"] = figure_html(plots.plot_reliability, metrics["reliability"], metrics["ece"])
    most_incorrect = sorted((e for c in lists["most_incorrect"].values() for e in c), key=lambda e: -e["p_pred"])[:16]
    most_correct = [e for c in lists["most_correct"].values() for e in c[:2]]
    body["interpretation"] = "".join([
        examples_grid(lists["random_correct"], paths, classes, "a few correct, at random"),
        examples_grid(lists["random_incorrect"], paths, classes, "a few incorrect, at random"),
        examples_grid(most_correct, paths, classes, "most correct per class (highest probability of the true class)"),
        examples_grid(most_incorrect, paths, classes, "most incorrect (highest-probability mistakes)"),
        examples_grid(lists["most_uncertain"], paths, classes, "most uncertain (top-2 probabilities closest)"),
        examples_grid(lists["top_losses"], paths, classes, "top losses"),
    ])
    shown = lists["top_losses"][:4] + most_correct[:4]
    body["gradcam"] = gradcam_section(
        classifier, [paths[e["index"]] for e in shown], [f"true {classes[e['true']]}" for e in shown],
        "Top losses, then most correct: each image, then where the predicted class's evidence is.")
    return summary, body


def _beyond_section(run: RunDir, records: list[dict]) -> str:
    """Semi-supervised and domain-adaptive runs: the pseudo-labels over time, the domains before and after,
    and the per-class accuracy on labelled target images (when given; read only after training)."""
    parts = []
    pseudo = [r for r in records if r.get("kind") is None and "train_pseudo_fraction" in r]
    if pseudo:
        series = {"given a pseudo-label": [r["train_pseudo_fraction"] for r in pseudo]}
        if all("train_confidence" in r for r in pseudo):
            series["mean confidence"] = [r["train_confidence"] for r in pseudo]
        parts.append("<h3>pseudo-labels</h3>" + figure_html(plots.plot_series, series, title="unlabelled images per epoch",
                                                             ylabel="fraction"))
    adaptation = run.read_json("adaptation.json", default={})
    if adaptation.get("before") and adaptation.get("after"):
        parts.append("<h3>source and target features</h3>" + figure_html(plots.plot_domains, adaptation["before"], adaptation["after"]))
    if adaptation.get("target"):
        target = adaptation["target"]
        rows = [[c, f"{v['recall']:.3f}", f"{v['precision']:.3f}", v["support"]] for c, v in target["per_class"].items()]
        parts.append(f"<h3>labelled target images: accuracy {target['accuracy']:.4f} on {target['n']}</h3>")
        base = adaptation.get("source_only")
        if base:
            line = (f"source-only (the same data and plan without adaptation): {base['accuracy']:.4f}, so the method is "
                    f"{100 * base['method_minus_source_only']:+.1f} points")
            parts.append(f"<p><strong>{line}: worse than not adapting</strong></p>" if base["worse_than_not_adapting"]
                         else f"<p>{line}</p>")
        parts.append(table_html(["class", "accuracy (recall)", "precision", "images"], rows))
    auto = run.read_json("auto.json", default={})
    if auto:
        parts.append(f"<h3>auto: {html.escape(str(auto['chosen']))}</h3><p>by {html.escape(auto['criterion'])}</p>"
                     + table_html(["method", "score"], [[m, f"{v:.4f}"] for m, v in auto["scores"].items()]))
    return "".join(parts)


def _network_section(classifier: Classifier, paths: list[str]) -> str:
    model = classifier.model
    kernels = kernel_tiles(model)
    rows = [kernels[i : i + 16] for i in range(0, len(kernels), 16)]
    parts = ["<h3>first-layer convolution kernels</h3>", figure_html(plots.image_grid, rows)]
    batch = [p for p in (preprocessed_image(classifier, path) for path in paths[:16]) if p is not None]
    if batch:
        layer = "blocks.2" if "blocks.2" in dict(model.named_modules()) else next(iter(dict(model.named_modules())))
        maps = feature_maps(model, batch[0][0], layer)
        parts += [f"<h3>feature maps of {layer} for one image</h3>",
                  figure_html(plots.image_grid, [[batch[0][1]] + list(maps[:7]), list(maps[7:15])], cmap="viridis")]
        fractions = dead_activation_fractions(model, torch.stack([x for x, _ in batch]))
        if fractions:
            parts += ["<h3>dead activations: fraction of exact zeros per activation layer (16 images)</h3>",
                      figure_html(plots.plot_bars, fractions, title="zero activations", xlabel="fraction of outputs = 0")]
    return "".join(parts)


#: The report of each kind of task (Task.report): its sections and their builder.
REPORTS = {
    "single-label": (SECTIONS, _single_label_sections),
    "multi-label": (MULTILABEL_SECTIONS, lambda run, classifier, data: multilabel_sections(classifier, data)),
}
