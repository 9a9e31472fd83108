"""The one place that opens image files (also inside .zip/.tar archives: data/archives.py).

Real-world folders hold CMYK JPEGs, palette PNGs with transparency, 16-bit TIFFs, rotated phone photos,
truncated downloads and the odd text file named `.jpg`. Every reader in visiontune goes through
:func:`load_rgb` so all of them agree on what an image is, and every failure carries the file and a
reason the user can act on. Pillow's decompression-bomb guard stays on: an image over
``Image.MAX_IMAGE_PIXELS`` is refused here, never decoded.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visiontune.data.archives import member_key, read_member, split_member
from visiontune.errors import ImageError  # noqa: F401  (raised here; defined light for the CLI)

#: Phone photos (iPhones save HEIC by default): read through pillow-heif's Pillow plugin when installed.
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
try:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    _HEIF = True
except ImportError:  # an install without the dependency: such files are skipped with what to do
    _HEIF = False

#: File endings treated as images when a folder is scanned (lower case, with the dot). AVIF is native in Pillow.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif", ".avif"}
) | (HEIF_EXTENSIONS if _HEIF else frozenset())


def unreadable_name_reason(path: str | Path) -> str:
    """Why a file is not taken as an image by its name (what to do, for the formats we know)."""
    suffix = Path(path).suffix.lower()
    if suffix in HEIF_EXTENSIONS and not _HEIF:
        return f"HEIC/HEIF photo ({suffix}): pip install pillow-heif to read it"
    return f"not an image file name ({suffix or 'no extension'})"


def is_image_name(path: str | Path) -> bool:
    """True when the file name looks like an image (by extension, case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@contextmanager
def _opened(path: Path, source: BinaryIO | None = None, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """Open an image (a file, or `source` bytes named `path`) with the bomb guard on and, with
    `max_pixels`, a stricter pixel limit checked from the header; every failure becomes an :class:`ImageError`."""
    try:
        if source is None and split_member(path) is not None:  # inside a .zip/.tar: read in place
            source = io.BytesIO(read_member(path))
            if not source.getbuffer().nbytes:
                raise ImageError(path, "empty file (0 bytes)")
        if source is None and path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source if source is not None else path) as img:
                if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
                    raise ImageError(path, f"{img.size[0]}x{img.size[1]} pixels is over the limit of {max_pixels:,}")
                yield img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"too many pixels (decompression-bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(path, f"corrupt or truncated image: {exc}") from None


def gray_thumbnail(path: str | Path, side: int) -> np.ndarray:
    """`side` x `side` grayscale pixels (uint8) of an image, decoded at reduced size where the format allows
    (JPEG `draft`), for cheap picture comparisons (near-duplicates)."""
    with _opened(Path(path)) as img:
        img.draft("L", (side * 2, side * 2))
        return np.asarray(img.convert("L").resize((side, side), Image.BILINEAR))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit is rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_rgb(data: bytes, name: str = "upload", max_pixels: int | None = None) -> Image.Image:
    """:func:`load_rgb` for bytes already in memory (uploads), with an optional pixel limit."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    with _opened(Path(name), io.BytesIO(data), max_pixels) as img:
        return _upright(img)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode a file fully into an upright 8-bit RGB image.

    Applies EXIF orientation (phone photos), converts every mode to RGB, and turns every decoding
    failure into :class:`ImageError` so callers can count and skip it instead of dying mid-run.
    """
    with _opened(Path(path)) as img:
        return _upright(img)


def load_rgb_or_gray(path: str | Path) -> Image.Image:
    """:func:`load_rgb`, except that an 8-bit grayscale image stays one channel ("L"): for the evaluation
    transform, which resizes first and converts after (ResizeCentreCrop), a third of the resizing work."""
    with _opened(Path(path)) as img:
        return _upright(img, keep_gray=True)


def _upright(img: Image.Image, keep_gray: bool = False) -> Image.Image:
    """An opened image fully decoded, EXIF-rotated and in RGB (or "L" with `keep_gray`), detached from its file."""
    img.load()
    upright = ImageOps.exif_transpose(img)
    return (upright if keep_gray and upright.mode == "L" else _to_rgb(upright)).copy()


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex, 32 chars): the identity of an image in the cache.

    Memoised in-process by (path, size, mtime) so several views of one run hash each file once.
    """
    memo_key = _memo_key(path)
    if memo_key not in _HASH_MEMO:
        digest = hashlib.sha256()
        if split_member(path) is not None:
            digest.update(read_member(path))
        else:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        _HASH_MEMO[memo_key] = digest.hexdigest()[:32]
    return _HASH_MEMO[memo_key]


def remember_hash(path: str | Path, digest: str) -> None:
    """Record `path`'s content hash for this process (known from the header-check record, data/checked.py)."""
    _HASH_MEMO[_memo_key(path)] = digest


def _memo_key(path: str | Path) -> tuple[str, int, int]:
    if split_member(path) is not None:
        return member_key(path)
    stat = os.stat(path)
    return str(path), stat.st_size, stat.st_mtime_ns


def probe_and_hash(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header alone (cheap: catches empty, non-image and bomb files early) and
    :func:`content_hash`, from one read of the file: the catalog checks every image on the way in and the
    cache keys it by content next, so the bytes are read once for both.

    Raises:
        ImageError: with the reason, for a file that cannot be an image we can use.
    """
    path = Path(path)
    try:
        memo_key = _memo_key(path)
        data = read_member(path) if split_member(path) is not None else path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    _HASH_MEMO[memo_key] = hashlib.sha256(data).hexdigest()[:32]
    with _opened(path, io.BytesIO(data)) as img:
        size = img.size
    truncated = _truncation(data)
    if truncated:
        raise ImageError(path, truncated)
    return size


#: (leading signature, end marker, name): the end marker must appear within the last bytes of a whole file
END_MARKERS = ((b"\x89PNG\r\n\x1a\n", b"IEND", "PNG"), (b"\xff\xd8", b"\xff\xd9", "JPEG"))


def _truncation(data: bytes, tail: int = 1024) -> str | None:
    """Why the bytes are a cut-off PNG/JPEG (no end marker near the end), else None. The header check alone
    passes a truncated file that then fails to decode mid-run; the bytes are already in memory for the hash,
    so this costs nothing and the catalog counts the file once, as skipped. A little trailing junk (some
    cameras append it) is tolerated."""
    for signature, marker, name in END_MARKERS:
        if data.startswith(signature) and marker not in data[-tail:]:
            return f"truncated {name} (the file ends before the image data does): re-copy or re-download it"
    return None
