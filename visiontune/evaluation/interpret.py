"""Where the model is wrong and why: fast.ai's interpretation lists, computed in one streaming pass.

fastai's ClassificationInterpretation keeps every decoded input in memory and runs out of it on large
validation sets. Here each batch of probabilities updates small bounded heaps and reservoirs, so memory
is O(k x classes + classes^2) whatever the number of images, and only image *indices* are kept; the
report decodes just the few images it shows.

Lists (each entry: index, true class, predicted class, p(predicted), p(true), loss, margin):
random correct / random incorrect (reservoir samples), most correct per class (highest p(true) among
right answers), most incorrect per class (highest p(predicted) among mistakes of that true class), most
uncertain (smallest top-1 - top-2 margin), top losses (largest -log p(true)); plus the most confused
(true, predicted) pairs from the confusion counts.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Example:
    index: int
    true: int
    pred: int
    p_pred: float
    p_true: float
    loss: float
    margin: float


class _TopK:
    """The k items with the largest key (ties broken by the smaller index, so results are deterministic)."""

    def __init__(self, k: int):
        self.k = k
        self.heap: list[tuple[float, int, Example]] = []

    def push(self, key: float, example: Example) -> None:
        item = (key, -example.index, example)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)

    def items(self) -> list[Example]:
        return [e for _, _, e in sorted(self.heap, key=lambda t: (t[0], t[1]), reverse=True)]


class _Reservoir:
    """A uniform random sample of k items from a stream (Vitter's algorithm R), seeded."""

    def __init__(self, k: int, rng: np.random.Generator):
        self.k, self.rng, self.seen, self.items = k, rng, 0, []

    def push(self, example: Example) -> None:
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(example)
        else:
            j = int(self.rng.integers(self.seen))
            if j < self.k:
                self.items[j] = example


class Interpreter:
    """Feed (indices, probabilities, labels) batch by batch with :meth:`update`; read :meth:`result`."""

    def __init__(self, n_classes: int, k: int = 8, seed: int = 0):
        self.n_classes, self.k = n_classes, k
        rng = np.random.default_rng(seed)
        self.correct = _Reservoir(k, rng)
        self.incorrect = _Reservoir(k, rng)
        self.most_correct = [_TopK(k) for _ in range(n_classes)]
        self.most_incorrect = [_TopK(k) for _ in range(n_classes)]
        self.uncertain = _TopK(k)
        self.losses = _TopK(k)
        self.confusion = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, indices: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> None:
        probs = np.asarray(probs, dtype=np.float64)
        top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.concatenate([np.zeros((len(probs), 1)), probs], 1)
        preds = probs.argmax(1)
        np.add.at(self.confusion, (labels, preds), 1)
        for row, index in enumerate(indices):
            true, pred = int(labels[row]), int(preds[row])
            p_true = float(probs[row, true])
            example = Example(
                int(index), true, pred, float(probs[row, pred]), p_true, -math.log(max(p_true, 1e-12)),
                float(top2[row, 1] - top2[row, 0]),
            )
            if pred == true:
                self.correct.push(example)
                self.most_correct[true].push(p_true, example)
            else:
                self.incorrect.push(example)
                self.most_incorrect[true].push(example.p_pred, example)
            self.uncertain.push(-example.margin, example)
            self.losses.push(example.loss, example)

    def most_confused(self, limit: int = 10) -> list[tuple[int, int, int]]:
        """(true, predicted, count) for the off-diagonal cells, largest first."""
        pairs = [(int(t), int(p), int(self.confusion[t, p])) for t in range(self.n_classes) for p in range(self.n_classes)
                 if t != p and self.confusion[t, p] > 0]
        return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))[:limit]

    def result(self) -> dict:
        """JSON-ready lists (examples as dicts)."""
        as_dicts = lambda items: [asdict(e) for e in items]  # noqa: E731
        return {
            "random_correct": as_dicts(self.correct.items),
            "random_incorrect": as_dicts(self.incorrect.items),
            "most_correct": {c: as_dicts(t.items()) for c, t in enumerate(self.most_correct)},
            "most_incorrect": {c: as_dicts(t.items()) for c, t in enumerate(self.most_incorrect)},
            "most_uncertain": as_dicts(self.uncertain.items()),
            "top_losses": as_dicts(self.losses.items()),
            "most_confused": self.most_confused(),
        }


def interpret(probs: np.ndarray, labels: np.ndarray, k: int = 8, seed: int = 0, batch_size: int = 1024) -> dict:
    """All lists for stored probabilities, fed through the streaming interpreter in batches."""
    interpreter = Interpreter(probs.shape[1], k, seed)
    for start in range(0, len(labels), batch_size):
        stop = min(start + batch_size, len(labels))
        interpreter.update(np.arange(start, stop), probs[start:stop], np.asarray(labels[start:stop]))
    return interpreter.result()
