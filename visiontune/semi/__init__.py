"""Semi-supervised methods, one file each; importing this package registers them as objectives
(self-training, which retrains on pseudo-labelled images rather than adding a loss, is beyond.self_train)."""

from visiontune.semi import cotrain, fixmatch, mean_teacher, pi, pseudo  # noqa: F401

#: The methods `--ssl` accepts (besides auto).
SSL_METHODS = ("pseudo", "pi", "mean-teacher", "fixmatch", "cotrain", "self-train")
