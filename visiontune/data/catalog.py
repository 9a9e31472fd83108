"""Discover labelled images in a source, check every file, and say clearly what is wrong with the data.

Three layouts are understood, tried in this order:

* ``train/`` and ``valid/`` (or ``val/``) folders, each with one sub-folder per class: the user's split;
* a CSV of labels (``filename,label``, Kaggle style) passed with ``labels=``;
* one sub-folder per class: split later by :mod:`visiontune.data.split`.

Bad files are skipped and counted (with their paths and reasons) so a long run never dies on one of them;
data that cannot train a classifier at all (an empty folder, a single class, a class with no usable image,
a CSV naming missing files) stops with a one-line :class:`DataError` before any training.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.data.archives import JUNK_PARTS, Archive, is_archive, open_archive, split_member, text_member
from visiontune.data.images import IMAGE_EXTENSIONS, is_image_name, unreadable_name_reason
from visiontune.data.checked import check_files
from visiontune.data.walk import Skipped, inside, outside_links_hint, walk_files
from visiontune.progress import track
from visiontune.errors import DataError  # noqa: F401  (raised here; defined light for the CLI)

VALID_DIR_NAMES = ("valid", "val", "validation")


@dataclass
class Catalog:
    """Images and their class indices, with the class names they index into."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    tags: list[list[int]] | None = None  # multi-label data: every class index of each image (labels = first)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multi_label(self) -> bool:
        return self.tags is not None

    def targets(self) -> np.ndarray:
        """Multi-hot matrix [images, classes] of a multi-label catalog."""
        matrix = np.zeros((len(self.paths), len(self.classes)), dtype=np.float32)
        for row, tags in enumerate(self.tags or []):
            matrix[row, tags] = 1.0
        return matrix

    def class_counts(self) -> dict[str, int]:
        """Images per class, in class order (zero for a class with none). A multi-label image counts for
        every tag it carries, not only its first one."""
        counts = Counter(tag for tags in self.tags for tag in tags) if self.tags is not None else Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def subset(self, indices: list[int]) -> Catalog:
        """The catalog restricted to `indices`, same class list (skips are not carried over)."""
        tags = [self.tags[i] for i in indices] if self.tags is not None else None
        return Catalog([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.classes, tags=tags)


@dataclass
class Source:
    """What a data folder holds: a training catalog and, when the user split it, a validation one."""

    root: Path
    layout: str  # "folders" | "split" | "csv"
    train: Catalog
    valid: Catalog | None

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def skipped(self) -> list[Skipped]:
        return self.train.skipped + (self.valid.skipped if self.valid else [])


# --- a folder, or a folder inside a .zip/.tar (data/archives.py): the same walk for both -------------
def _in_archive(path: Path) -> tuple[Archive, str] | None:
    """(archive, folder prefix inside it) when `path` is an archive or a folder inside one."""
    if is_archive(path):
        return open_archive(path), ""
    found = split_member(path)
    return (open_archive(found[0]), found[1]) if found else None


def is_folder(path: Path) -> bool:
    """A folder, an archive (.zip/.tar: its root) or a folder inside an archive."""
    inside = _in_archive(path)
    return path.is_dir() if inside is None else inside[0].is_folder(inside[1])


def _is_file(path: Path) -> bool:
    found = split_member(path)
    return path.is_file() if found is None else found[1] in open_archive(found[0]).members


def _subfolders(path: Path) -> list[Path]:
    inside = _in_archive(path)
    if inside is None:
        return sorted(p for p in path.iterdir() if p.is_dir())
    return [path / name for name in inside[0].folders(inside[1])]


def files_below(folder: Path, root: Path | None = None, skipped: list[Skipped] | None = None) -> list[Path]:
    """Every file below `folder`, recursively and sorted (inside archives too), junk and hidden names left
    out and nothing whose real path is outside the data folder `root` (default `folder`): those refused
    go to `skipped` with their reason (`data/walk.py`)."""
    inside = _in_archive(folder)
    if inside is None:
        files, refused = walk_files(folder, root)
        if skipped is not None:
            skipped.extend(refused)
        return files
    archive, prefix = inside
    return [folder / name[len(prefix) + 1 if prefix else 0:] for name in archive.files(prefix)]


def archive_skipped(root: Path) -> list[Skipped]:
    """Members of the archive at (or holding) `root` that were refused on opening it, with the reason."""
    inside = _in_archive(root)
    if inside is None:
        return []
    archive = inside[0]
    base = root if is_archive(root) else split_member(root)[0]
    return [Skipped(str(base / name), reason) for name, reason in archive.skipped]


def _find_valid_dir(root: Path) -> Path | None:
    for name in VALID_DIR_NAMES:
        if is_folder(root / name):
            return root / name
    return None


def _scan_class_folders(root: Path) -> tuple[dict[str, list[Path]], list[Skipped]]:
    """Map class name -> files below its folder (recursively); non-image names are skipped."""
    if not is_folder(root):
        raise DataError(f"{root}: not a folder. Pass a folder with one sub-folder per class.")
    class_dirs = [p for p in _subfolders(root) if not p.name.startswith(".") and p.name not in JUNK_PARTS]
    files: dict[str, list[Path]] = {}
    skipped: list[Skipped] = []
    for class_dir in class_dirs:
        files[class_dir.name] = _image_files(class_dir, root, skipped)
    return files, skipped


def _image_files(folder: Path, root: Path, skipped: list[Skipped]) -> list[Path]:
    """Image files below `folder` (recursively, sorted, hidden and junk ones left out); other names, and links
    leading outside the data folder `root`, go to `skipped`."""
    found = []
    for path in files_below(folder, root, skipped):
        if is_image_name(path):
            found.append(path)
        else:
            skipped.append(Skipped(str(path), unreadable_name_reason(path)))
    return found


def _check_files(paths: list[Path], labels: list[int], what: str) -> tuple[list[Path], list[int], list[Skipped]]:
    """Read each file once: its header (keep the readable ones, skip the rest with the reason) and its content
    hash, which the feature cache keys it by next."""
    kept_paths, kept_labels, skipped = [], [], []
    reasons = check_files(list(paths), progress=lambda items, total: track(items, f"checking {what} images", total))
    for path, label, reason in zip(paths, labels, reasons):
        if reason is not None:
            skipped.append(Skipped(str(path), reason))
            continue
        kept_paths.append(path)
        kept_labels.append(label)
    return kept_paths, kept_labels, skipped


def refused_summary(skipped: list[Skipped], shown: int = 3) -> str:
    """'a.jpg (empty file (0 bytes)); b.png (...); and 4 more': the refused files inside an error message, so
    a run that stops before it has a folder still says which files and why (it has no skipped.txt yet)."""
    parts = [f"{Path(s.path).name} ({s.reason})" for s in skipped[:shown]]
    return "; ".join(parts) + (f"; and {len(skipped) - shown} more" if len(skipped) > shown else "")


def no_images_message(where: Path, skipped: list[Skipped] | None = None, classes: list[str] | None = None) -> str:
    """Why a folder gave no labelled image, from what is actually in it, and what to do."""
    where = Path(where)
    skipped = skipped or []
    links = outside_links_hint(where, skipped)
    if links:
        return links
    loose = sum(1 for p in files_below(where) if p.parent == where and is_image_name(p)) if is_folder(where) else 0
    layout = "one sub-folder per class" + (f" named like the classifier's classes ({', '.join(classes[:5])}"
                                           f"{', ...' if len(classes) > 5 else ''})" if classes else "")
    if loose:
        return (f"{where}: {loose} images are directly in this folder, but their classes are unknown. Put them in "
                f"{layout}, e.g. {where}/cat/1.jpg, {where}/dog/2.jpg, or pass --labels labels.csv "
                "(columns filename,label).")
    if skipped:
        return (f"{where}: none of the {len(skipped)} image files could be read. Check that they are images and not "
                "truncated.")
    return (f"{where}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in class sub-folders). "
            f"Put images in {layout}, e.g. DATA/cat/1.jpg, DATA/dog/2.jpg.")


def _require_trainable(catalog: Catalog, where: Path, labels_csv: Path | None = None) -> None:
    """Stop with one actionable line when a catalog cannot train a classifier (the classes of a labels CSV
    are named as the CSV's, not as folders)."""
    if len(catalog) == 0:
        refused = f" Refused: {refused_summary(catalog.skipped)}." if catalog.skipped else ""
        raise DataError(no_images_message(where, catalog.skipped) + refused)
    if len(catalog.classes) < 2:
        raise DataError(
            f"{where}: only one class ({catalog.classes[0]!r}); a classifier needs at least two. "
            "Add a sub-folder per class."
        )
    empty = [name for name, n in catalog.class_counts().items() if n == 0]
    if empty:
        if labels_csv is not None:
            kind = "tag(s)" if catalog.multi_label else "class(es)"
            what, fix = f"{kind} of {labels_csv.name}", "Add readable images of them to the CSV or remove their rows."
        else:
            what, fix = "class folder(s)", "Add images there or remove the folder(s)."
        raise DataError(
            f"{where}: {what} with no usable image: {', '.join(empty)}. {fix}"
            + (f" Refused files: {refused_summary(catalog.skipped)}." if catalog.skipped else "")
        )


def catalog_from_folders(root: Path, classes: list[str] | None = None, check: bool = True) -> Catalog:
    """Read one-sub-folder-per-class. `classes` fixes the class order (e.g. a validation folder's)."""
    files, skipped = _scan_class_folders(root)
    if classes is None:
        classes = sorted(files)
    else:
        unknown = sorted(set(files) - set(classes))
        if unknown:
            raise DataError(
                f"{root}: class folder(s) not in the training classes: {', '.join(unknown)}. "
                f"Known classes: {', '.join(classes)}."
            )
    index = {name: i for i, name in enumerate(classes)}
    paths = [p for name in sorted(files) for p in files[name]]
    labels = [index[name] for name in sorted(files) for _ in files[name]]
    if check:
        paths, labels, bad = _check_files(paths, labels, root.name)
        skipped += bad
    return Catalog(paths, labels, list(classes), skipped)


#: Header names of the file and label columns (lower case; spaces and dashes read as underscores).
FILE_COLUMNS = ("filename", "file", "file_name", "fname", "id", "image", "image_id", "image_file", "image_name",
                "img", "path", "name")
LABEL_COLUMNS = ("label", "labels", "class", "class_name", "category", "target", "tags", "y", "breed", "species")


def _resolve_csv_file(root: Path, name: str) -> Path | None:
    """The file a CSV row names: relative to the data folder, trying image extensions when it has none."""
    candidate = root / name
    if _is_file(candidate):
        return candidate
    if not Path(name).suffix:
        for ext in (".jpg", ".png", ".jpeg", ".tif", ".bmp", ".webp"):
            if _is_file(candidate.with_suffix(ext)):
                return candidate.with_suffix(ext)
    return None


def _csv_columns(header: list[str]) -> tuple[int, int] | None:
    """(file column, label column) when `header` is a header row naming them, else None."""
    names = [cell.strip().lower().replace(" ", "_").replace("-", "_") for cell in header]
    files = [i for i, n in enumerate(names) if n in FILE_COLUMNS]
    labels = [i for i, n in enumerate(names) if n in LABEL_COLUMNS]
    if files and labels:
        return files[0], labels[0]
    return (0, 1) if files or labels else None


def _csv_rows(root: Path, labels_csv: Path) -> tuple[list[tuple[Path, str, str]], list[Skipped]]:
    """(file, name as written, label) per usable row, and the rows refused with their line and reason:
    files outside the data folder (absolute paths, `..`), missing files, repeated rows (the first is kept),
    files given two different labels (all their rows refused: which label is right is the user's call)."""
    with (text_member(labels_csv) if split_member(labels_csv) else labels_csv.open(newline="", encoding="utf-8-sig")) as handle:
        lines = [(number, row) for number, row in enumerate(csv.reader(handle), start=1)
                 if row and any(cell.strip() for cell in row)]
    if lines and lines[0][1] and lines[0][1][0].startswith("\ufeff"):  # a BOM inside an archive member
        lines[0] = (lines[0][0], [lines[0][1][0].lstrip("\ufeff"), *lines[0][1][1:]])
    file_col, label_col = 0, 1
    if lines:
        columns = _csv_columns(lines[0][1])
        if columns is not None:
            file_col, label_col = columns
            lines = lines[1:]
        elif len(lines) > 1 and _resolve_csv_file(root, lines[0][1][0].strip()) is None \
                and _resolve_csv_file(root, lines[1][1][0].strip()) is not None:
            lines = lines[1:]  # a header with names we do not know: the first row names no file, the next does
    if not lines:
        raise DataError(f"{labels_csv}: no rows. Expected 'filename,label' lines.")
    short = [n for n, row in lines if len(row) <= max(file_col, label_col) or not row[label_col].strip()]
    if short:
        raise DataError(f"{labels_csv}: rows without a label (lines {short[:5]}). Expected 'filename,label'.")
    real_root = os.path.realpath(root) if split_member(root) is None else None
    rows, skipped, first_line, label_of = [], [], {}, {}
    for number, row in lines:
        name, label = row[file_col].strip(), row[label_col].strip()
        where = f"{labels_csv.name} line {number}"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            skipped.append(Skipped(name, f"{where}: names a file outside the data folder (absolute or '..' path): not read"))
            continue
        path = _resolve_csv_file(root, name)
        if path is None:
            skipped.append(Skipped(str(root / name), f"{where}: file not found under {root}"))
            continue
        if real_root is not None and not inside(os.path.realpath(path), [real_root]):
            skipped.append(Skipped(str(path), f"{where}: a link to a file outside the data folder: not read"))
            continue
        if path in first_line:
            if label_of[path] == label:
                skipped.append(Skipped(str(path), f"{where}: repeats line {first_line[path]}; used once"))
            else:
                label_of[path] = None  # contradictory: refused below
                skipped.append(Skipped(str(path), f"{where}: a second label ({label!r}) for the file of line "
                                                  f"{first_line[path]}: every row of it skipped; fix the CSV"))
            continue
        first_line[path], label_of[path] = number, label
        rows.append((path, name, label))
    rows = [row for row in rows if label_of[row[0]] is not None]
    missing = sum(1 for s in skipped if "file not found" in s.reason)
    if not rows or missing * 2 >= len(lines):
        example = ", ".join(s.path for s in skipped if "file not found" in s.reason)[:200]
        raise DataError(
            f"{labels_csv}: {missing} of {len(lines)} files named in the CSV are missing under {root} "
            f"(first: {example}). Fix the paths (relative to the data folder) or remove the rows."
        )
    return rows, skipped


def catalog_from_csv(root: Path, labels_csv: Path, check: bool = True) -> Catalog:
    """Read a Kaggle-style labels CSV: a file column (relative to `root`) and a label column, found by
    their header names in any order (else the first two columns); refused rows are skipped with their line."""
    if not _is_file(labels_csv):
        raise DataError(f"{labels_csv}: labels file not found. Pass --labels PATH/TO/labels.csv.")
    resolved, refused = _csv_rows(root, labels_csv)
    tag_lists = [label.split() for _, _, label in resolved]
    if any(len(tags) > 1 for tags in tag_lists):  # space-separated tags (Kaggle Planet): multi-label
        classes = sorted({t for tags in tag_lists for t in tags})
        index = {name: i for i, name in enumerate(classes)}
        paths, rows, skipped = [path for path, _, _ in resolved], list(range(len(resolved))), []
        if check:
            paths, rows, skipped = _check_files(paths, rows, labels_csv.name)
        tags = [sorted({index[t] for t in tag_lists[r]}) for r in rows]
        return Catalog(paths, [t[0] for t in tags], classes, refused + skipped, tags=tags)
    classes = sorted({label for _, _, label in resolved})
    index = {name: i for i, name in enumerate(classes)}
    paths = [path for path, _, _ in resolved]
    labels = [index[label] for _, _, label in resolved]
    skipped: list[Skipped] = []
    if check:
        paths, labels, skipped = _check_files(paths, labels, labels_csv.name)
    return Catalog(paths, labels, classes, refused + skipped)


def discover(root: str | Path, labels: str | Path | None = None, check: bool = True) -> Source:
    """Find the layout of `root` and catalog it, raising :class:`DataError` for unusable data."""
    root = Path(root).expanduser()
    if not root.exists() and split_member(root) is None:
        raise DataError(f"{root}: no such folder. Check the path.")
    if not is_folder(root):
        raise DataError(f"{root}: is a file, not a folder. Pass the folder that holds the images (or a .zip/.tar of it).")
    refused = archive_skipped(root)  # members a .zip/.tar held that are unsafe to read (reported, never read)
    if labels is not None:
        train = catalog_from_csv(root, Path(labels).expanduser(), check)
        train.skipped[:0] = refused
        _require_trainable(train, root, Path(labels))
        return Source(root, "csv", train, None)
    valid_dir = _find_valid_dir(root)
    if is_folder(root / "train") and valid_dir is not None:
        train = catalog_from_folders(root / "train", check=check)
        train.skipped[:0] = refused
        _require_trainable(train, root / "train")
        valid = catalog_from_folders(valid_dir, classes=train.classes, check=check)
        if len(valid) == 0:
            raise DataError(f"{valid_dir}: no usable validation images. Add images or remove the folder.")
        return Source(root, "split", train, valid)
    train = catalog_from_folders(root, check=check)
    train.skipped[:0] = refused
    _require_trainable(train, root)
    return Source(root, "folders", train, None)


def unlabelled_catalog(root: str | Path, what: str = "unlabelled", check: bool = True) -> Catalog:
    """Every image file below `root`, recursively, without labels (label -1): an unlabelled folder for
    semi-supervised learning or a target-domain folder for adaptation. Class sub-folders are allowed and
    ignored; hidden files are left out, other non-image names and unreadable files are skipped with the
    reason."""
    root = Path(root).expanduser()
    if not is_folder(root):
        raise DataError(f"{root}: no such folder of {what} images. Pass a folder (searched recursively) or a .zip/.tar.")
    skipped: list[Skipped] = archive_skipped(root)
    paths = _image_files(root, root, skipped)
    labels = [-1] * len(paths)
    if check:
        paths, labels, bad = _check_files(paths, labels, what)
        skipped += bad
    if not paths:
        raise DataError(f"{root}: no usable {what} images found (searched recursively); {len(skipped)} files skipped.")
    return Catalog(paths, labels, [], skipped)


def labelled_like(root: str | Path, classes: list[str], labels: str | Path | None = None) -> Catalog:
    """Labelled images to *evaluate* on with a known class list: class folders (or a labels CSV)."""
    root = Path(root).expanduser()
    catalog = catalog_from_csv(root, Path(labels)) if labels else catalog_from_folders(root, classes=classes)
    if catalog.classes != classes:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(catalog.classes) - set(classes))
        if unknown:
            raise DataError(f"{root}: classes the training data does not have: {', '.join(unknown)}")
        catalog = Catalog(catalog.paths, [index[catalog.classes[y]] for y in catalog.labels], classes, catalog.skipped)
    return catalog
