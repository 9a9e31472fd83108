"""visiontune: a folder of labelled images -> a strong, explained, deployable image classifier, on CPU."""

__version__ = "0.1.0"

from visiontune.api import Classifier, Plan, Prediction, evaluate, fit, load, predict  # noqa: E402

__all__ = ["fit", "load", "predict", "evaluate", "Classifier", "Prediction", "Plan", "__version__"]
