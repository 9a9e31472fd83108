"""`visiontune show RUN --mistakes`: the model's most confident mistakes in the terminal.

A rich table always; the images themselves inline where the terminal can draw them (iTerm2's OSC 1337
protocol, kitty's graphics protocol — the notes' imgcat), else their paths.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import numpy as np

from rich.console import Console
from rich.table import Table

from visiontune.data.images import ImageError, load_rgb
from visiontune.runs import RunDir
from visiontune.task.kinds import task_named
from visiontune.task.kinds import thresholds as saved_thresholds


def inline_image_protocol(env: dict | None = None) -> str | None:
    """'iterm2', 'kitty' or None, from the terminal's environment variables."""
    env = os.environ if env is None else env
    if env.get("TERM_PROGRAM") == "iTerm.app" or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm2"
    if env.get("TERM") == "xterm-kitty" or "KITTY_WINDOW_ID" in env:
        return "kitty"
    return None


def inline_image(path: str, protocol: str, size: int = 96) -> str:
    """Escape sequence drawing the image at `path` (thumbnail PNG) in the terminal."""
    buffer = io.BytesIO()
    load_rgb(path).resize((size, size)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    if protocol == "iterm2":
        return f"\033]1337;File=inline=1;width=8;preserveAspectRatio=1:{data}\a"
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    out = []
    for k, chunk in enumerate(chunks):
        more = 1 if k < len(chunks) - 1 else 0
        head = "f=100,a=T," if k == 0 else ""
        out.append(f"\033_G{head}m={more};{chunk}\033\\")
    return "".join(out)


def show(run: str | Path, mistakes: bool = True, limit: int = 12, console: Console | None = None) -> list[dict]:
    """Print the run's summary and its most confident mistakes; returns the rows shown."""
    from visiontune.report.parts import valid_predictions

    run_dir = RunDir.open(run)
    console = console or Console()
    data = valid_predictions(run_dir)
    meta = run_dir.classifier_meta()
    task = task_named(meta.get("task"), meta)
    return SHOW[task.report](run_dir.path, data, meta["classes"], meta, mistakes, limit, console)


def _show_single_label(run: Path, data: dict, classes: list[str], meta: dict, mistakes: bool, limit: int, console: Console) -> list[dict]:
    """A single-label run's accuracy and its most confident mistakes (inline images where the terminal can)."""
    from visiontune.evaluation.interpret import interpret

    lists = interpret(data["probs"], data["labels"], k=limit)
    accuracy = float((data["probs"].argmax(1) == data["labels"]).mean())
    console.print(f"{run.name}: validation accuracy {accuracy:.4f} on {len(data['labels'])} images")
    if not mistakes:
        return []
    rows = sorted((e for c in lists["most_incorrect"].values() for e in c), key=lambda e: -e["p_pred"])[:limit]
    table = Table(title="most confident mistakes")
    for column in ("image", "true", "predicted", "p(pred)", "p(true)"):
        table.add_column(column)
    for e in rows:
        table.add_row(data["paths"][e["index"]], classes[e["true"]], classes[e["pred"]], f"{e['p_pred']:.3f}", f"{e['p_true']:.3f}")
    console.print(table)
    protocol = inline_image_protocol() if sys.stdout.isatty() else None
    if protocol:
        for e in rows:
            try:
                sys.stdout.write(inline_image(data["paths"][e["index"]], protocol) + f"  {classes[e['true']]} → {classes[e['pred']]}\n")
            except ImageError:
                continue
        sys.stdout.flush()
    return rows


def _show_multilabel(run: Path, data: dict, classes: list[str], meta: dict, mistakes: bool, limit: int, console: Console) -> list[dict]:
    """A multi-label run's summary and its most confident wrong tags (false tags and misses, interleaved by
    confidence): a multi-label mistake is one (image, tag) decision, not one image."""
    from visiontune.report.multilabel import every_tag_right, worst_pairs

    probs, targets = data["probs"], data["labels"]
    thresholds = saved_thresholds(meta, len(classes))
    right = every_tag_right(targets, probs, thresholds)
    console.print(f"{run.name}: every tag right on {right.mean():.4f} of {len(targets)} validation images")
    if not mistakes:
        return []
    pairs = worst_pairs(targets, probs, thresholds, False, limit) + worst_pairs(targets, probs, thresholds, True, limit)
    rows = sorted(({"index": i, "tag": classes[t], "labelled": bool(targets[i, t]), "p": float(probs[i, t]),
                    "threshold": float(thresholds[t])} for i, t in pairs), key=lambda r: -abs(r["p"] - r["labelled"]))[:limit]
    table = Table(title="most confident wrong tags")
    for column in ("image", "tag", "labelled", "p(tag)", "threshold"):
        table.add_column(column)
    for r in rows:
        table.add_row(data["paths"][r["index"]], r["tag"], "yes" if r["labelled"] else "no", f"{r['p']:.3f}", f"{r['threshold']:.2f}")
    console.print(table)
    return rows


SHOW = {"single-label": _show_single_label, "multi-label": _show_multilabel}  # by Task.report


def show_gradcam(run: str | Path, images: list[str], out: str | Path | None = None) -> Path:
    """Grad-CAM overlays (image, then where the predicted class's evidence is) for chosen images -> PNG."""
    from visiontune.classifier import Classifier
    from visiontune.report.parts import gradcam_tiles
    from visiontune.report.plots import image_grid

    clf = Classifier.load(run)
    for path in images:
        load_rgb(path)  # an unreadable image stops here with its reason
    tiles, titles = gradcam_tiles(clf, images, [Path(p).name for p in images])
    target = Path(out) if out else Path(run) / "gradcam.png"
    return image_grid([tiles], target, tile_titles=[titles])


def show_feature_maps(run: str | Path, image: str, layer: str, out: str | Path | None = None, limit: int = 16) -> Path:
    """The first `limit` channels of module `layer`'s output for one image -> PNG."""
    from visiontune.classifier import Classifier
    from visiontune.errors import UsageError
    from visiontune.evaluation.visualize import feature_maps
    from visiontune.report.parts import preprocessed_image
    from visiontune.report.plots import image_grid

    clf = Classifier.load(run)
    if layer not in dict(clf.model.named_modules()):
        raise UsageError(f"--layer {layer!r}: no such module; e.g. conv_stem, blocks.0 ... blocks.6, conv_head")
    prepared = preprocessed_image(clf, image)
    if prepared is None:
        raise ImageError(image, "cannot be read as an image")
    maps = feature_maps(clf.model, prepared[0], layer, limit)
    target = Path(out) if out else Path(run) / f"feature-maps-{layer}.png"
    rows = [[prepared[1]] + list(maps[:8]), list(maps[8:16])]
    return image_grid([r for r in rows if r], target, title=f"{layer} for {Path(image).name}", cmap="viridis")


def show_kernels_demo(run: str | Path, image: str, out: str | Path | None = None, learned: int = 8) -> Path:
    """What a convolution does, on your own image -> PNG: classic hand-made kernels (blur, sharpen, Sobel,
    emboss, Laplacian) beside the backbone's first `learned` learned filters and their responses."""
    from visiontune.classifier import Classifier
    from visiontune.evaluation.visualize import CLASSIC_KERNELS, classic_responses, feature_maps, first_conv, kernel_tiles
    from visiontune.report.parts import preprocessed_image
    from visiontune.report.plots import image_grid

    clf = Classifier.load(run)
    prepared = preprocessed_image(clf, image)
    if prepared is None:
        raise ImageError(image, "cannot be read as an image")
    tensor, shown = prepared
    gray = shown.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    classic = classic_responses(gray)
    stem = next(name for name, module in clf.model.named_modules() if module is first_conv(clf.model))
    responses = feature_maps(clf.model, tensor, stem, learned)
    tiles = [np.kron(t, np.ones((8, 8, 1), dtype=np.uint8)) for t in kernel_tiles(clf.model)[:learned]]
    rows = [[shown, *classic.values()], tiles, list(responses)]
    titles = [["your image", *CLASSIC_KERNELS], [f"learned filter {k}" for k in range(len(tiles))],
              [f"response {k}" for k in range(len(responses))]]
    target = Path(out) if out else Path(run) / "kernels-demo.png"
    return image_grid(rows, target, tile_titles=titles, cmap="gray",
                      title=f"hand-made kernels (top) vs {clf.arch}'s first learned filters ({stem}) on {Path(image).name}")
