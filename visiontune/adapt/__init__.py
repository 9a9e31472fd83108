"""Domain adaptation, one file per method; importing this package registers them as `--adapt` methods
(train/extra_methods.py): coral, mmd and dann as objectives; tca and jda as closed-form projections of the
pooled features (subspace.py); coral-cut re-colours the source activations (coral_cut.py), and
coral-cut+self-train then self-trains on the target (semi/self_train.py). `none` (the labelled source alone)
is registered with the interface itself."""

from visiontune import semi  # noqa: F401  (self-train serves both kinds; coral-cut+self-train builds on it)
from visiontune.adapt import coral, coral_cut, dann, mmd, subspace  # noqa: F401
