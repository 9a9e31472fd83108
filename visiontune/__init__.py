"""visiontune: a folder of labelled images -> a strong, explained, deployable image classifier, on CPU.

The Python API is :mod:`visiontune.api` (one function per command); the most used ones are here too.
"""

from visiontune.version import __version__
from visiontune import api  # noqa: E402
from visiontune.api import (  # noqa: E402
    Classifier,
    Plan,
    Prediction,
    ensemble_runs,
    evaluate,
    find_lr,
    fit,
    load,
    predict,
    resume,
)
from visiontune.train.objectives import Objective, register_objective  # noqa: E402

__all__ = ["api", "fit", "resume", "find_lr", "load", "predict", "evaluate", "ensemble_runs", "Classifier", "Prediction",
           "Plan", "Objective", "register_objective", "__version__"]
