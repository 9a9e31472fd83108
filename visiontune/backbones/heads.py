"""The classifier on top of the pooled features: timm's linear layer, or a small MLP in its place.

Row 29 of the notes: "the top can be softmax or an SVM" — and with a hidden layer, a small MLP. Linear
heads (`linear`, `logreg`, `svm`) all live in timm's own `nn.Linear` (an SVM or a logistic regression fitted
by scikit-learn is folded into its weight and bias), so the saved model is a plain timm model. Only `mlp`
changes the structure; `classifier.json` records it (`head`, `head_hidden`) so loading rebuilds the same
module before filling it from the safetensors file.
"""

from __future__ import annotations

from torch import nn

MLP_HIDDEN = 256


class MLPHead(nn.Module):
    """Pooled features -> hidden layer (ReLU, dropout) -> logits. `in_features`/`out_features` mirror
    nn.Linear's, which the rest of visiontune reads from whatever `get_classifier()` returns."""

    def __init__(self, in_features: int, out_features: int, hidden: int = MLP_HIDDEN, dropout: float = 0.2):
        super().__init__()
        self.in_features, self.out_features, self.hidden = in_features, out_features, hidden
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, out_features))

    @property
    def output(self) -> nn.Linear:
        """The last layer (started at zero like the linear head: uniform predictions at step 0)."""
        return self.layers[-1]

    def forward(self, x):
        return self.layers(x)


def output_layer(classifier: nn.Module) -> nn.Linear:
    """The layer producing the logits: the classifier itself, or an MLP's last layer."""
    return classifier.output if isinstance(classifier, MLPHead) else classifier


def install_head(model: nn.Module, kind: str, hidden: int = MLP_HIDDEN) -> None:
    """Give `model` the head `kind` needs: an MLP in place of timm's classifier for `mlp`; linear heads keep
    timm's layer. Used by training and by `Classifier.load` (from classifier.json's `head`)."""
    if kind != "mlp" or isinstance(model.get_classifier(), MLPHead):
        return
    current = model.get_classifier()
    model.classifier = MLPHead(current.in_features, current.out_features, hidden)


def head_record(model: nn.Module) -> dict:
    """What classifier.json keeps so that loading rebuilds this head (nothing for a linear one)."""
    classifier = model.get_classifier()
    return {"head": "mlp", "head_hidden": classifier.hidden} if isinstance(classifier, MLPHead) else {}
