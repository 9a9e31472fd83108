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


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_resizing_only_the_crop_box_equals_resize_then_centre_crop(interpolation):
    """ResizeCentreCrop on odd sizes, gray and colour, against (1) the full resize done as Pillow's two passes,
    horizontal then vertical, then cropped: at most 2 of 255 (the box's ends are rounded to float32, and
    the first pass's rounding to 8 bits can carry that into the second);
    (2) torchvision's Resize + CenterCrop, whose Pillow sometimes runs the vertical pass first: exact on a
    28 px square at 224 (the Fashion-MNIST case), within 2 of 255 on smooth images; nearest-neighbour is
    torchvision's exactly. A gray image resized before its RGB conversion gives what the RGB image gives."""
    from torchvision.transforms import v2 as T

    from visiontune.data.transforms import INTERPOLATION, ResizeCentreCrop

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[interpolation]
    rng = np.random.default_rng(1)
    for size in (224, 64, 33):
        pre = Preprocessing(size, PRE.mean, PRE.std, interpolation=interpolation)
        resize = T.Resize(pre.resize_size, interpolation=INTERPOLATION[interpolation], antialias=True)
        ours = ResizeCentreCrop(pre)
        for width, height in [(28, 28), (300, 41), (17, 500), (640, 480), (size, size)]:
            noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            smooth = Image.fromarray(noise).resize((max(2, width // 8), max(2, height // 8)), Image.BOX)
            smooth = smooth.resize((width, height), Image.BILINEAR)
            for image in (Image.fromarray(noise), Image.fromarray(noise[..., 0], "L"), smooth):
                new_w, new_h = resize(image).size
                top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
                two_passes = image.resize((new_w, image.height), resample).resize((new_w, new_h), resample)
                two_passes = np.asarray(two_passes)[top : top + size, left : left + size].astype(int)
                torchvision = np.asarray(T.CenterCrop(size)(resize(image))).astype(int)
                got = np.asarray(ours(image)).astype(int)
                assert got.shape == torchvision.shape and got.shape[:2] == (size, size)
                if interpolation == "nearest" or (width, height, size) == (28, 28, 224):
                    assert np.array_equal(got, torchvision), (width, height, image.mode)
                else:
                    assert np.abs(got - two_passes).max() <= 2, (width, height, image.mode)
                    assert (got != two_passes).mean() < 0.4
                    if image is smooth:
                        assert np.abs(got - torchvision).max() <= 2, (width, height)
            gray = Image.fromarray(noise[..., 0], "L")
            assert np.array_equal(np.asarray(ours(gray).convert("RGB")), np.asarray(ours(gray.convert("RGB"))))


def test_gray_files_stay_one_channel_until_resized_and_give_the_rgb_numbers(tmp_path):
    """load_rgb_or_gray keeps 8-bit gray as "L" (a third of the resizing); every other mode is load_rgb's RGB;
    through the evaluation transform both give the same tensor as the RGB image."""
    from visiontune.data.images import load_rgb, load_rgb_or_gray

    rng = np.random.default_rng(2)
    gray, palette = tmp_path / "gray.png", tmp_path / "palette.png"
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L").save(gray)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert("P").save(palette)
    assert load_rgb_or_gray(gray).mode == "L" and load_rgb_or_gray(palette).mode == "RGB"
    assert np.array_equal(np.asarray(load_rgb_or_gray(palette)), np.asarray(load_rgb(palette)))
    for path in (gray, palette):
        assert torch.equal(eval_transform(PRE)(load_rgb_or_gray(path)), eval_transform(PRE)(load_rgb(path)))
    kept, outputs = collect_outputs(lambda x: x.flatten(1), [gray], PRE, batch_size=4)
    assert np.array_equal(outputs[0], eval_transform(PRE)(load_rgb(gray)).flatten().numpy())
