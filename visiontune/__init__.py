"""visiontune: a folder of labelled images -> a strong, explained, deployable image classifier, on CPU.

The Python API is :mod:`visiontune.api` (one function per command); its most used names are reachable
here too (`visiontune.fit`, `visiontune.load`, ...). They are imported on first use (PEP 562), so
importing a low layer such as `visiontune.data.catalog` does not pull in torch and the whole API.
"""

from __future__ import annotations

import importlib

from visiontune.version import __version__

_FROM_API = {"fit", "resume", "find_lr", "load", "predict", "evaluate", "ensemble_runs", "Classifier", "Prediction", "Plan"}
_FROM_OBJECTIVES = {"Objective", "register_objective"}

__all__ = ["api", *sorted(_FROM_API), *sorted(_FROM_OBJECTIVES), "__version__"]


def __getattr__(name: str):
    if name == "api":
        return importlib.import_module("visiontune.api")
    if name in _FROM_API:
        return getattr(importlib.import_module("visiontune.api"), name)
    if name in _FROM_OBJECTIVES:
        return getattr(importlib.import_module("visiontune.train.objectives"), name)
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
