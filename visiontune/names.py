"""The names the command line offers (augmentation presets, inference engines, TTA modes).

They live in a module that imports nothing heavy so that `visiontune --help` and argument errors answer
without loading torch; the modules that implement them import the names from here (one source of truth).
"""

from __future__ import annotations

import importlib.util

AUGMENTATIONS = ("none", "light", "standard", "strong", "aerial")
ENGINES = ("torch", "torch-bf16", "onnxruntime")
#: What every command that runs a model offers as --engine: `auto` (onnxruntime where installed) or an engine.
ENGINE_CHOICES = ("auto", *ENGINES)
#: `--device` of every command that runs a model (visiontune/device.py chooses and checks it).
DEVICE_HELP = "where the model runs: auto (CUDA if present, else Apple MPS, else CPU) | cpu | cuda | cuda:N | mps"
#: Images per forward pass when predicting, evaluating or scoring (what the predict bench measures).
INFERENCE_BATCH = 32
TTA_MODES = ("none", "flip", "flips", "5crop", "10crop", "scale")
COMBINE = ("mean", "geometric")
#: `--prior` of predict/evaluate (evaluation/priors.py).
PRIOR_HELP = ("class proportions of the images being predicted, when they differ from training: balanced, "
              "estimate (EM on these images, Saerens et al. 2002) or comma-separated proportions in class order")
#: The built-in `--ssl` / `--adapt` methods, in trial order, for --help without importing torch. The registry
#: (train/extra_methods.py) is the truth: it also holds methods registered by plugins, and a test keeps this equal
#: to its built-in part.
BUILTIN_METHODS = {
    "ssl": ("pseudo", "pi", "mean-teacher", "fixmatch", "cotrain", "self-train"),
    "adapt": ("coral", "coral-cut", "coral-cut+self-train", "mmd", "tca", "jda", "dann", "self-train", "none"),
}
#: Classifier heads on the pooled features (backbones/heads.py, train/probe.py).
HEADS = ("auto", "linear", "logreg", "svm", "mlp")


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def default_engine() -> str:
    """onnxruntime where installed (fastest exact engine), else torch."""
    return "onnxruntime" if onnxruntime_available() else "torch"


def resolve_engine(engine: str | None) -> str:
    """An --engine choice as an engine: `auto` (or none given) -> :func:`default_engine`; the older name
    `onnx` -> onnxruntime."""
    if engine in (None, "auto"):
        return default_engine()
    return "onnxruntime" if engine == "onnx" else engine
