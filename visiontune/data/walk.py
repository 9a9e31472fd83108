"""Listing the files of a real folder safely: junk left out, symbolic links never lead outside the data.

A folder that users hand us holds, by accident, OS junk (`__MACOSX/`, `.DS_Store`, `Thumbs.db`,
`desktop.ini`), hidden files, and symbolic links: inside the folder (fine), dangling, looping, or pointing
at files elsewhere on the machine (a link to `~/.ssh/id_rsa` named `cat.jpg`). visiontune reads nothing
outside the folder it was given: every file's real path must lie under the data folder's real path, or
under a folder named in ``<data>/.visiontune-links`` (one absolute path per line — `visiontune split`
writes it when it has to symlink into the source folder, and a user may add their own). Links to folders
are never walked into (no loops, no surprises); a link to a folder outside is reported, one inside is
ignored (its files are listed where they really are). Junk and hidden names are left out silently — they
are not data and not problems; everything else that is refused is returned with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from visiontune.data.archives import JUNK_NAMES, JUNK_PARTS

LINKS_FILE = ".visiontune-links"


@dataclass
class Skipped:
    """A file left out of a catalog and why."""

    path: str
    reason: str


def is_junk_or_hidden(relative: Path) -> bool:
    """OS junk or a hidden name anywhere in `relative` (a path below the data folder)."""
    parts = relative.parts
    return any(p in JUNK_PARTS or p.startswith(".") for p in parts) or bool(parts and parts[-1] in JUNK_NAMES)


def allowed_roots(root: Path) -> list[str]:
    """Real paths files may live under: the data folder's and those listed in its links file (in the folder,
    or the one above it: `train/` and `valid/` of one dataset share DATA/.visiontune-links)."""
    real = os.path.realpath(root)
    roots = [real]
    for listed in (Path(real) / LINKS_FILE, Path(real).parent / LINKS_FILE):
        if listed.is_file():
            roots += [os.path.realpath(line.strip()) for line in listed.read_text().splitlines() if line.strip()]
    return roots


def outside_links_hint(where: Path, skipped: list[Skipped]) -> str | None:
    """When refused files are mostly links leading outside `where`: which folder they lead into and how to
    allow it — the usual cause of "no usable image" in a folder of links (a held-out set made with ln -s)."""
    outside = [s.path for s in skipped if s.reason.startswith("symbolic link to")]
    if not outside or len(outside) * 2 < len(skipped):
        return None
    targets = [os.path.dirname(os.path.realpath(p)) for p in outside]
    common = os.path.commonpath(targets) if len(set(targets)) > 1 else targets[0]
    return (f"{where}: {len(outside)} of its files are symbolic links leading outside it (into {common}), which "
            f"visiontune does not read. Allow that folder: echo {common} >> {Path(where) / LINKS_FILE} "
            "(or copy the files in).")


def inside(real: str, roots: list[str]) -> bool:
    """`real` (a real path) is one of `roots` or below one."""
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _outside_reason(path: Path, real: str, root: Path, what: str) -> str:
    return (f"symbolic link to {what} outside the data folder ({real}): not read. Copy it into {root}, or add "
            f"the folder it is in to {Path(root) / LINKS_FILE} (one path per line) to allow it")


def walk_files(folder: Path, root: Path | None = None) -> tuple[list[Path], list[Skipped]]:
    """Files below `folder` (recursively, sorted; junk and hidden names left out) whose real path is inside
    the data folder `root` (default: `folder`), and the refused ones with their reason."""
    root = Path(root or folder)
    roots = allowed_roots(root)
    files: list[Path] = []
    skipped: list[Skipped] = []
    if not inside(os.path.realpath(folder), roots):  # e.g. a class folder that is a link to elsewhere
        return [], [Skipped(str(folder), _outside_reason(folder, os.path.realpath(folder), root, "a folder"))]
    for here, dirs, names in os.walk(folder, followlinks=False):
        base = Path(here)
        dirs[:] = sorted(d for d in dirs if not is_junk_or_hidden((base / d).relative_to(root)))
        for d in list(dirs):
            link = base / d
            if link.is_symlink():  # os.walk does not descend into it; say why when it leads outside
                real = os.path.realpath(link)
                if not os.path.exists(real):
                    skipped.append(Skipped(str(link), "broken symbolic link (its target is missing, or a link loop)"))
                elif not inside(real, roots):
                    skipped.append(Skipped(str(link), _outside_reason(link, real, root, "a folder")))
        for name in sorted(names):
            path = base / name
            if is_junk_or_hidden(path.relative_to(root)):
                continue
            real = os.path.realpath(path)
            if not os.path.exists(real):
                skipped.append(Skipped(str(path), "broken symbolic link (its target is missing, or a link loop)"))
            elif not inside(real, roots):
                skipped.append(Skipped(str(path), _outside_reason(path, real, root, "a file")))
            elif os.path.isfile(real):
                files.append(path)
            # a link to a folder inside the data: its files are listed where they really are
    return sorted(files), skipped
