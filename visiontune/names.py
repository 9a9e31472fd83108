"""The names the command line offers (augmentation presets, inference engines, TTA modes).

They live in a module that imports nothing heavy so that `visiontune --help` and argument errors answer
without loading torch; the modules that implement them import the names from here (one source of truth).
"""

from __future__ import annotations

import importlib.util

AUGMENTATIONS = ("none", "light", "standard", "strong", "aerial")
ENGINES = ("torch", "torch-bf16", "onnxruntime")
TTA_MODES = ("none", "flip", "flips", "5crop", "10crop", "scale")
COMBINE = ("mean", "geometric")
#: `--prior` of predict/evaluate (evaluation/priors.py).
PRIOR_HELP = ("class proportions of the images being predicted, when they differ from training: balanced, "
              "estimate (EM on these images, Saerens et al. 2002) or comma-separated proportions in class order")
#: Classifier heads on the pooled features (backbones/heads.py, train/probe.py).
HEADS = ("auto", "linear", "logreg", "svm", "mlp")


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def default_engine() -> str:
    """onnxruntime where installed (fastest exact engine), else torch."""
    return "onnxruntime" if onnxruntime_available() else "torch"
