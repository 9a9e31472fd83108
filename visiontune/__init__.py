"""visiontune: a folder of labelled images -> a strong, explained, deployable image classifier, on CPU."""

from visiontune.version import __version__

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

__all__ = ["fit", "resume", "find_lr", "load", "predict", "evaluate", "ensemble_runs", "Classifier", "Prediction", "Plan",
           "__version__"]
