"""Pieces every report section is built from: inline figures and tables, thumbnails of image files,
the run's validation predictions, Grad-CAM tiles. Shared by the single- and multi-label reports and
`visiontune show`, so none of them imports another."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import torch

from visiontune.classifier import Classifier
from visiontune.data.images import ImageError, load_rgb
from visiontune.data.transforms import denormalise_uint8, eval_transform
from visiontune.evaluation.visualize import grad_cam, overlay
from visiontune.report import plots
from visiontune.runs import RunDir, Split


def figure_html(draw, *args, **kwargs) -> str:
    """Render a plots.* function into an inline <img>."""
    buffer = io.BytesIO()
    draw(*args, path=buffer, **kwargs)
    alt = html.escape(draw.__name__.replace("_", " "))
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def table_html(header: list[str], rows: list[list]) -> str:
    """An HTML table of `rows` under `header`, every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def thumb(path: str, size: int = 96) -> np.ndarray:
    try:
        return np.asarray(load_rgb(path).convert("RGB").resize((size, size)))
    except ImageError:
        return np.zeros((size, size, 3), dtype=np.uint8)


def valid_predictions(run: RunDir, classifier: Classifier | None = None) -> dict:
    """The run's validation probabilities (predictions.npz), computed and saved when missing."""
    split = run.read_split()
    if split is None:
        raise FileNotFoundError(f"{run.path}: no split.json (the run stopped before training); rerun or resume it")
    saved = run.read_predictions()
    if saved is None:
        classifier = classifier or Classifier.load(run.path)
        kept, probs = classifier.probabilities(split.valid)
        run.save_predictions(kept, probs, split.targets("valid")[kept])
        saved = run.read_predictions()
    paths = [split.valid[i] for i in saved["positions"]]
    return {"paths": paths, "probs": saved["probs"], "labels": saved["labels"], "split": split}


def png_data_uri(tile: np.ndarray) -> str:
    """An RGB uint8 array as an inline PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(tile, dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def grid_html(tiles: list[np.ndarray], captions: list[str]) -> str:
    """Images with an HTML caption each, wrapping to the window's width. Captions are page text, not pixels
    of a scaled-down figure, so they stay readable at 100 % zoom (and the page builds without matplotlib)."""
    items = "".join(
        f'<figure class="tile"><img alt="{html.escape(caption)}" src="{png_data_uri(tile)}">'
        f"<figcaption>{html.escape(caption).replace(chr(10), '<br>')}</figcaption></figure>"
        for tile, caption in zip(tiles, captions)
    )
    return f'<div class="grid">{items}</div>'




def thumbnails(images: list[str], captions: list[str], title: str) -> str:
    """A titled grid of thumbnails of image files with a caption each ("none" when there are none)."""
    if not images:
        return f"<p class='empty'>{html.escape(title)}: none</p>"
    return f"<h3>{html.escape(title)}</h3>" + grid_html([thumb(path) for path in images], captions)


def examples_grid(examples: list[dict], paths: list[str], classes: list[str], title: str) -> str:
    captions = [f"{classes[e['true']]} → {classes[e['pred']]}\np={e['p_pred']:.2f} loss={e['loss']:.2f}" for e in examples]
    return thumbnails([paths[e["index"]] for e in examples], captions, title)


def class_counts(split: Split, classes: list[str], key: str) -> dict[str, dict[str, int]]:
    """Images per class in the train and valid parts of split.json (`key`: "labels", or "tags" for multi-label)."""
    counts = {part: {c: 0 for c in classes} for part in ("train", "valid")}
    for part in counts:
        for entry in getattr(split, f"{part}_{key}") or []:
            for label in entry if isinstance(entry, list) else [entry]:
                counts[part][classes[label]] += 1
    return counts


def preprocessed_image(classifier: Classifier, path: str) -> tuple[torch.Tensor, np.ndarray] | None:
    try:
        image = load_rgb(path)
    except ImageError:
        return None
    x = eval_transform(classifier.preprocessing)(image)
    return x, denormalise_uint8(x, classifier.preprocessing)


def gradcam_tiles(classifier: Classifier, images: list[str], captions: list[str]) -> tuple[list, list[str]]:
    """For each readable image: the image (captioned) and its Grad-CAM overlay for the predicted class."""
    tiles, titles = [], []
    for path, caption in zip(images, captions):
        prepared = preprocessed_image(classifier, path)
        if prepared is None:
            continue
        x, shown = prepared
        heat, index = grad_cam(classifier.model, x)
        tiles += [shown, overlay(shown, heat)]
        titles += [caption, f"evidence for {classifier.classes[index]}"]
    return tiles, titles


def gradcam_section(classifier: Classifier, images: list[str], captions: list[str], intro: str) -> str:
    """`intro`, then each readable image next to its Grad-CAM overlay ("no images" when none is readable)."""
    tiles, titles = gradcam_tiles(classifier, images, captions)
    return f"<p>{html.escape(intro)}</p>" + grid_html(tiles, titles) if tiles else "<p>no images</p>"
