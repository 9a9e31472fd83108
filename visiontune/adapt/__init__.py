"""Domain adaptation, one file per method; importing this package registers the trainable ones as
objectives (tca and jda are closed-form feature transforms: adapt/subspace.py; self-train retrains on
pseudo-labelled target images: beyond.self_train)."""

from visiontune.adapt import coral, dann, mmd  # noqa: F401

#: The methods `--adapt` accepts (besides auto); "none" trains on the source only.
ADAPT_METHODS = ("coral", "mmd", "tca", "jda", "dann", "self-train", "none")
#: The ones that are closed-form transforms of pooled features rather than objectives.
SUBSPACE_METHODS = ("tca", "jda")
