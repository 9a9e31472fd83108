"""Domain adaptation, one file per method; importing this package registers the trainable ones as
objectives (tca and jda are closed-form feature transforms: adapt/subspace.py; coral-cut re-colours the
source activations: adapt/coral_cut.py; self-train retrains on pseudo-labelled target images:
beyond.self_train)."""

from visiontune.adapt import coral, dann, mmd  # noqa: F401

#: The methods `--adapt` accepts (besides auto); "none" trains on the source only.
ADAPT_METHODS = ("coral", "coral-cut", "coral-cut+self-train", "mmd", "tca", "jda", "dann", "self-train", "none")
#: The ones that are closed-form transforms of pooled features rather than objectives.
SUBSPACE_METHODS = ("tca", "jda")
#: The ones that train on re-coloured source activations (closed-form CORAL at the cut; the second then
#: self-trains on the target images, its re-coloured source model giving the pseudo-labels).
RECOLOUR_METHODS = ("coral-cut", "coral-cut+self-train")
