"""evaluate/: streaming interpretation lists vs brute force, metrics, calibration, TTA, visualisation,
hard examples, the terminal view."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score

from visiontune.data.transforms import Preprocessing, eval_transform
from visiontune.evaluation.hard_examples import classify_hardness
from visiontune.evaluation.interpret import Interpreter, interpret
from visiontune.evaluation.metrics import calibration, classification_metrics, curves
from visiontune.inference.tta import TTA_MODES, combine, tta_transform, tta_views
from visiontune.evaluation.visualize import dead_activation_fractions, feature_maps, grad_cam, kernel_tiles
from visiontune.report.show import inline_image, inline_image_protocol


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    n, k = 300, 4
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1.5, size=(n, k))
    logits[np.arange(n), labels] += 1.5  # mostly right, plenty wrong
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_streaming_lists_match_brute_force(predictions):
    probs, labels = predictions
    k = 5
    result = interpret(probs, labels, k=k, batch_size=37)  # odd batches: the streaming path
    preds = probs.argmax(1)
    p_true = probs[np.arange(len(labels)), labels]
    for c in range(4):
        correct = np.flatnonzero((preds == labels) & (labels == c))
        expected = correct[np.argsort(-p_true[correct])][:k]
        assert [e["index"] for e in result["most_correct"][c]] == expected.tolist()
        wrong = np.flatnonzero((preds != labels) & (labels == c))
        expected = wrong[np.argsort(-probs[wrong, preds[wrong]])][:k]
        assert [e["index"] for e in result["most_incorrect"][c]] == expected.tolist()
    top2 = np.sort(probs, 1)
    margin = top2[:, -1] - top2[:, -2]
    assert [e["index"] for e in result["most_uncertain"]] == np.argsort(margin)[:k].tolist()
    losses = -np.log(p_true)
    assert [e["index"] for e in result["top_losses"]] == np.argsort(-losses)[:k].tolist()
    assert result["top_losses"][0]["loss"] == pytest.approx(losses.max())
    confusion = np.zeros((4, 4), int)
    np.add.at(confusion, (labels, preds), 1)
    np.fill_diagonal(confusion, 0)
    t, p, count = result["most_confused"][0]
    assert count == confusion.max() and confusion[t, p] == count
    assert all(preds[e["index"]] == labels[e["index"]] for e in result["random_correct"])
    assert all(preds[e["index"]] != labels[e["index"]] for e in result["random_incorrect"])
    assert len(result["random_correct"]) == k and len({e["index"] for e in result["random_incorrect"]}) == k


def test_interpreter_memory_does_not_grow_with_the_data():
    interpreter = Interpreter(3, k=4)
    rng = np.random.default_rng(1)
    for start in range(0, 20_000, 1000):
        probs = rng.dirichlet(np.ones(3), size=1000)
        interpreter.update(np.arange(start, start + 1000), probs, rng.integers(0, 3, 1000))
    sizes = [len(interpreter.correct.items), len(interpreter.incorrect.items), len(interpreter.uncertain.heap)]
    sizes += [len(t.heap) for t in interpreter.most_correct + interpreter.most_incorrect]
    assert max(sizes) == 4 and interpreter.confusion.sum() == 20_000


def test_metrics_cover_auc_averages_and_calibration(predictions):
    probs, labels = predictions
    m = classification_metrics(labels, probs, ["a", "b", "c", "d"])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert {"macro_f1", "micro_f1", "weighted_f1", "average_precision", "ece", "confusion_matrix_normalized"} <= set(m)
    assert np.allclose(np.asarray(m["confusion_matrix_normalized"]).sum(1), 1, atol=1e-3)
    c = curves(labels, probs, ["a", "b", "c", "d"])
    assert set(c["roc"]) == {"a", "b", "c", "d"} and c["roc"]["a"]["auc"] == pytest.approx(roc_auc_score(labels == 0, probs[:, 0]))
    binary = classification_metrics(labels % 2, np.stack([1 - probs[:, 0], probs[:, 0]], 1), ["x", "y"])
    assert 0 <= binary["roc_auc"] <= 1


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20_000)
    correct = rng.random(20_000) < confidence  # calibrated by construction
    probs = np.stack([confidence, 1 - confidence], 1)
    labels = np.where(correct, 0, 1)
    assert calibration(labels, probs)["ece"] < 0.02
    overconfident = calibration(labels, np.stack([np.full(20_000, 0.99), np.full(20_000, 0.01)], 1))
    assert overconfident["ece"] == pytest.approx(0.99 - correct.mean(), abs=0.01)


@pytest.mark.parametrize("mode", TTA_MODES)
def test_tta_views(mode):
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray((rng.random((80, 100, 3)) * 255).astype(np.uint8))
    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    views = tta_transform(pre, mode)(image)
    assert views.shape == (tta_views(mode), 3, 64, 64)
    plain = eval_transform(pre)(image)
    if mode in ("none", "flip", "flips"):
        assert torch.equal(views[0], plain)
    if mode in ("flip", "flips"):
        assert torch.equal(views[1], plain.flip(-1))
    if mode == "flips":
        assert torch.equal(views[3], plain.transpose(-1, -2))
    if mode == "10crop":
        assert torch.allclose(views[5], views[1].flip(-1))  # top-left of the mirror = mirrored top-right
    assert len({tuple(v.flatten()[:50].tolist()) for v in views}) == len(views)  # all distinct


def test_tta_combinations():
    probs = torch.tensor([[[0.9, 0.1], [0.5, 0.5], [0.01, 0.99]]])
    assert torch.allclose(combine(probs, "mean"), torch.tensor([[0.47, 0.53]]))
    geo = combine(probs, "geometric")
    expected = torch.tensor([(0.9 * 0.5 * 0.01) ** (1 / 3), (0.1 * 0.5 * 0.99) ** (1 / 3)])
    assert torch.allclose(geo, (expected / expected.sum()).unsqueeze(0), atol=1e-5)


def test_visualisations_read_the_network():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()
    tiles = kernel_tiles(model)
    assert len(tiles) == 32 and tiles[0].shape == (3, 3, 3) and tiles[0].dtype == np.uint8
    image = torch.randn(3, 64, 64)
    maps = feature_maps(model, image, "blocks.2", limit=8)
    assert maps.shape[0] == 8 and maps.ndim == 3
    fractions = dead_activation_fractions(model, torch.randn(4, 3, 64, 64))
    assert fractions and all(0 <= v <= 1 for v in fractions.values())
    heat, index = grad_cam(model, image)
    assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-5)
    assert 0 <= index < 3


def test_hardness_kinds():
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.55, 0.45], [0.99, 0.01]])
    labels = np.array([1, 1, 0, 0])
    assert classify_hardness(probs, labels, margin=0.2, confident=0.9) == ["likely-label-error", "wrong", "barely-right", None]


def test_inline_images_in_capable_terminals(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "x.png")
    assert inline_image_protocol({"TERM_PROGRAM": "iTerm.app"}) == "iterm2"
    assert inline_image_protocol({"TERM": "xterm-kitty"}) == "kitty"
    assert inline_image_protocol({"TERM": "xterm-256color"}) is None
    assert inline_image(str(tmp_path / "x.png"), "iterm2").startswith("\033]1337;File=inline=1")
    assert inline_image(str(tmp_path / "x.png"), "kitty").startswith("\033_Gf=100,a=T,")
