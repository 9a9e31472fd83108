"""Semi-supervised methods, one file each; importing this package registers them (their objectives, and
each as a `--ssl` method: train/extra_methods.py). Self-training (self_train.py) retrains on pseudo-labelled
images rather than adding a loss, and also serves `--adapt`."""

from visiontune.semi import cotrain, fixmatch, mean_teacher, pi, pseudo, self_train  # noqa: F401
