"""One folder holding everything a real image folder contains by accident (issue G), for every command's tests.

`build_corpus(root)` writes:

* ``root/data/`` — class folders ``red``, ``green``, ``blue`` of good images plus, spread over them, every
  oddity below; ``root/data/valid/`` is *not* used (class-folder layout), so `train` splits it itself;
* ``root/outside/secret.png`` — a readable image outside the data folder that a symlink points at: it must
  never be read (a sentinel for "nothing outside the data folder is read");
* ``root/flat/`` + ``root/flat/labels.csv`` — the CSV layout with a BOM, unexpected column names in a
  different order, repeated and contradictory rows, missing files and a path-traversal row.

It returns a `Corpus` naming which files must be *used* (odd but valid images) and which must be *skipped*
with a reason containing a given word, so a test can check each problem is reported exactly once.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

import visiontune.data.images  # noqa: F401  (registers the HEIF plugin that writes the .heic sample)

from conftest import COLOURS, make_image


@dataclass
class Corpus:
    data: Path
    outside: Path
    flat: Path
    labels_csv: Path
    used: list[str] = field(default_factory=list)  # paths relative to data/, odd but readable images
    skipped: dict[str, str] = field(default_factory=dict)  # path relative to data/ -> word in its reason
    ignored: list[str] = field(default_factory=list)  # junk that must be neither a class, an image nor reported
    duplicate_across_classes: tuple[str, str] = ("", "")
    csv_skipped: dict[str, str] = field(default_factory=dict)  # CSV row name -> word in its reason


def _png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _odd_images(colour, rng) -> dict[str, bytes]:
    """Valid images in every awkward encoding a folder meets; all must be read as the class's colour."""
    base = make_image(colour, rng)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    sixteen = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).convert("I;16")
    palette = base.convert("P", palette=Image.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    frames = [base, base.rotate(90), base.rotate(180)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "photo.webp": _encoded(base, "WEBP", quality=90),
        "scan.tiff": _encoded(base, "TIFF"),
        "paint.bmp": _encoded(base, "BMP"),
        "moving.gif": animated.getvalue(),
        "print cmyk.jpg": _encoded(base.convert("CMYK"), "JPEG", quality=95),
        "deep-16bit.png": _png(sixteen),
        "palette-alpha.png": _png(palette, transparency=0),
        "phone-rotated.jpg": _encoded(base.resize((48, 32)), "JPEG", exif=exif.tobytes()),
        "tiny-1x1.png": _png(Image.new("RGB", (1, 1), colour)),
        "ünïcödé 名前 with spaces.png": _png(base),
        "iphone.heic": _encoded(base, "HEIF"),  # pillow-heif's plugin (a visiontune dependency)
        "modern.avif": _encoded(base, "AVIF"),
    }


def _broken_files(colour, rng) -> dict[str, tuple[bytes, str]]:
    """Files named like images that are not usable ones -> (bytes, a word their skip reason must contain)."""
    good_jpeg = _encoded(make_image(colour, rng), "JPEG", quality=90)
    good_png = _png(make_image(colour, rng))
    bomb = io.BytesIO()
    big = Image.new("1", (20_000, 20_000))  # 400 MP > Pillow's 179 MP guard; a few kB on disk
    info = PngImagePlugin.PngInfo()
    big.save(bomb, format="PNG", pnginfo=info)
    return {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated"),
        "zero.jpg": (b"", "empty"),
        "notes.png": (b"meeting notes, not a picture\n" * 5, "not a readable image"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not a readable image"),
        "bomb.png": (bomb.getvalue(), "pixels"),
        "fake.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "image"),
    }


def build_corpus(root: Path, per_class: int = 10, seed: int = 0) -> Corpus:
    root = Path(root)
    data, outside, flat = root / "data", root / "outside", root / "flat"
    corpus = Corpus(data, outside, flat, flat / "labels.csv")
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = data / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            make_image(colour, rng).save(folder / f"{name}_{i:03d}.png")
    red, green, blue = (data / name for name in COLOURS)

    for filename, content in _odd_images(COLOURS["red"], rng).items():
        (red / filename).write_bytes(content)
        corpus.used.append(f"red/{filename}")
    (green / "nested" / "deeper").mkdir(parents=True)
    make_image(COLOURS["green"], rng).save(green / "nested" / "deeper" / "inner.png")
    corpus.used.append("green/nested/deeper/inner.png")

    for filename, (content, word) in _broken_files(COLOURS["blue"], rng).items():
        (blue / filename).write_bytes(content)
        corpus.skipped[f"blue/{filename}"] = word

    # The same image in two classes: label noise / leakage, reported by `train`.
    (green / "copied-from-red.png").write_bytes((red / "red_000.png").read_bytes())
    corpus.duplicate_across_classes = ("red/red_000.png", "green/copied-from-red.png")

    # Symlinks: one inside the folder (fine), a loop, one to a file outside, one dangling.
    outside.mkdir()
    make_image(COLOURS["blue"], rng).save(outside / "secret.png")
    os.symlink(green / "green_001.png", green / "link-inside.png")
    corpus.used.append("green/link-inside.png")
    os.symlink(outside / "secret.png", blue / "link-outside.png")
    corpus.skipped["blue/link-outside.png"] = "outside"
    os.symlink(outside, blue / "linked-folder")  # a folder symlink leading out: never walked
    os.symlink(green / "loop", green / "loop")  # a link to itself
    os.symlink(blue / "gone.png", blue / "dangling.png")
    corpus.skipped["blue/dangling.png"] = "missing"

    # Hidden files and folders, OS junk: neither classes nor images nor reported problems.
    (data / ".hidden-class").mkdir()
    make_image(COLOURS["red"], rng).save(data / ".hidden-class" / "x.png")
    (red / ".secret.png").write_bytes((red / "red_002.png").read_bytes())
    (data / "__MACOSX" / "red").mkdir(parents=True)
    (data / "__MACOSX" / "red" / "._red_000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for junk in (".DS_Store", "red/.DS_Store", "blue/Thumbs.db", "green/desktop.ini"):
        (data / junk).write_bytes(b"junk")
    corpus.ignored = [".hidden-class/x.png", "red/.secret.png", "__MACOSX/red/._red_000.png", ".DS_Store",
                      "red/.DS_Store", "blue/Thumbs.db", "green/desktop.ini"]

    # The CSV layout.
    flat.mkdir()
    names = []
    for name, colour in COLOURS.items():
        for i in range(per_class):
            make_image(colour, rng).save(flat / f"{name}{i}.png")
            names.append((f"{name}{i}.png", name))
    (flat / "broken.jpg").write_bytes(b"not a jpeg")
    rows = ["Label,Image File"]  # unexpected names, label first
    rows += [f"{label},{filename}" for filename, label in names]
    rows += [f"red,{names[0][0]}"]  # an exact repeat of a row
    rows += [f"blue,{names[1][0]}"]  # the same file with another label
    rows += ["green,missing-photo.png", "red,../outside/secret.png", "blue,/etc/passwd", "green,broken.jpg"]
    corpus.labels_csv.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    corpus.csv_skipped = {names[0][0]: "repeats", names[1][0]: "second label", "missing-photo.png": "not found", "../outside/secret.png": "outside",
                          "/etc/passwd": "outside", "broken.jpg": "not a readable image"}
    return corpus
