"""data/images.py: every odd file either decodes to upright RGB or raises ImageError with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visiontune.data.images import ImageError, load_rgb, probe_and_hash


def test_modes_become_rgb(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(cmyk)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(rgba)  # fully transparent red -> white
    palette = tmp_path / "p.gif"
    Image.new("P", (20, 10), 3).save(palette)
    gray16 = tmp_path / "g16.png"
    Image.fromarray(np.linspace(0, 65535, 200).reshape(10, 20).astype(np.uint16)).save(gray16)
    gray = tmp_path / "g.png"
    Image.new("L", (20, 10), 128).save(gray)
    for path in (cmyk, rgba, palette, gray16, gray):
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (20, 10), path
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(cmyk).getpixel((0, 0))[0] > 200  # C=0 M=255 Y=255 is red
    arr16 = np.asarray(load_rgb(gray16))
    assert arr16.min() == 0 and arr16.max() == 255  # 16-bit range rescaled, not clipped


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "empty file"), (b"this is not an image", "not a readable image")],
)
def test_bad_files_raise_with_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    for reader in (probe_and_hash, load_rgb):
        with pytest.raises(ImageError, match=reason) as info:
            reader(path)
        assert info.value.path == str(path)


def test_truncated_file_fails_on_decode(tmp_path):
    path = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_rgb(path)


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for reader in (probe_and_hash, load_rgb):
        with pytest.raises(ImageError, match="decompression-bomb"):
            reader(path)
