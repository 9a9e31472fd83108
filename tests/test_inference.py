"""The inference stream: background decoding keeps order, surfaces errors, and gives the same numbers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.data.loader import prefetch
from visiontune.data.transforms import Preprocessing, eval_transform, eval_transform_uint8, normalise_batch
from visiontune.inference.stream import collect_outputs

PRE = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def write_images(root, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        path = root / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_prefetch_keeps_order_and_runs_in_another_thread():
    seen = []

    def items():
        for i in range(50):
            seen.append(threading.get_ident())
            yield i

    assert list(prefetch(items())) == list(range(50))
    assert set(seen) == {seen[0]} and seen[0] != threading.get_ident()


def test_prefetch_raises_the_producers_error_in_the_consumer():
    def items():
        yield 1
        raise ValueError("bad batch")

    stream = prefetch(items())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(stream)


def test_prefetch_stops_its_thread_when_the_consumer_leaves_early():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "visiontune-decode" for t in threading.enumerate())
    assert len(produced) < 10


def test_uint8_batches_normalised_together_equal_the_per_image_transform(tmp_path):
    paths = write_images(tmp_path, 5)
    images = [Image.open(p).convert("RGB") for p in paths]
    per_image = torch.stack([eval_transform(PRE)(img) for img in images])
    batch = normalise_batch(torch.stack([eval_transform_uint8(PRE)(img) for img in images]), PRE)
    assert batch.dtype == torch.float32 and torch.equal(per_image, batch)


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_gives_inline_numbers_in_order_and_skips_a_bad_file(tmp_path, workers):
    paths = write_images(tmp_path, 23)
    paths[7].write_bytes(paths[7].read_bytes()[:60])  # truncated
    expected = torch.stack([eval_transform(PRE)(Image.open(p).convert("RGB")) for i, p in enumerate(paths) if i != 7])
    skipped = []
    kept, outputs = collect_outputs(lambda x: x.flatten(1), paths, PRE, batch_size=4, workers=workers, skipped=skipped)
    assert kept.tolist() == [i for i in range(23) if i != 7]
    assert np.array_equal(outputs, expected.flatten(1).numpy())
    assert [s.path for s in skipped] == [str(paths[7])]


def test_onnxruntime_parallel_sessions_give_one_sessions_numbers_in_order(tmp_path, monkeypatch):
    """A batch shared by single-threaded sessions (chunks taken as threads come free) gives bitwise what one
    session gives, in the batch's order; one image goes to the session on every core; with one session
    allowed (several processes on the machine) the batch stays in that session."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from visiontune.inference import engines

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    forward = engines.compile_forward(module, "onnxruntime", 32, tmp_path / "m.onnx")
    images = torch.randn(7, 3, 32, 32)  # 7 images: chunks of 4 at this size, the last one short
    one = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    expected = one.run(None, {"images": images.numpy()})[0]
    shared = forward(images).numpy()
    assert forward.pool is not None and np.array_equal(shared, expected)
    assert np.array_equal(forward(images[3:4]).numpy(), expected[3:4])
    assert engines.parallel_sessions(engines.SESSION_WEIGHTS_BUDGET // 2) == 2  # 2 threads here
    assert engines.parallel_sessions(engines.SESSION_WEIGHTS_BUDGET) == 1  # one copy of a huge model only
    monkeypatch.setattr(engines, "parallel_sessions", lambda model_bytes: 1)
    single = engines.compile_forward(module, "onnxruntime", 32, tmp_path / "m.onnx")
    assert np.array_equal(single(images).numpy(), expected) and single.pool is None
