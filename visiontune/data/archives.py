"""Archives as data: images read in place from .zip and .tar (.gz/.bz2/.xz) files, never extracted.

Kaggle and colleagues ship data as archives. A path inside one is the archive's path joined with the
member's name — `data.zip/train/cat/1.jpg` — so class folders, train/valid splits, labels CSVs, skipped-file
lists, reports and predictions work unchanged: `data/images.py` (the only file opener) reads such a path
from the archive, and `data/catalog.py` lists an archive the way it lists a folder.

Hostile archives: members with absolute paths or `..` components (path traversal), links and devices in
tars, encrypted zip members, members compressed more than MAX_RATIO:1 (zip bombs) or larger than
MAX_MEMBER_BYTES, and repeated names are skipped, each with its reason; an archive whose members add up to
more than MAX_TOTAL_BYTES is refused whole. Junk a zip tool adds (`__MACOSX/`, dot-files) is ignored like
hidden files in a folder. Nothing is ever written to disk.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from visiontune.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_RATIO = 100  # images barely compress (JPEG/PNG are compressed already): 100:1 is a bomb, not a photo
MAX_MEMBER_BYTES = 256 << 20
MAX_TOTAL_BYTES = 64 << 30
MAX_COMPRESSED_TAR_BYTES = 2 << 30  # a compressed tar has no random access: its members are held in memory
JUNK_PARTS = {"__MACOSX"}
JUNK_NAMES = {"Thumbs.db", "desktop.ini"}


def has_archive_suffix(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_archive(path: str | Path) -> bool:
    """A file whose name says zip or tar."""
    path = Path(path)
    return has_archive_suffix(path.name) and path.is_file()


def split_member(path: str | Path) -> tuple[Path, str] | None:
    """(archive, member name) for a path inside an archive (`data.zip/train/cat/1.jpg`), else None."""
    text = str(path).lower()
    if not any(suffix + os.sep in text for suffix in ARCHIVE_SUFFIXES):
        return None
    path = Path(path)
    for parent in path.parents:
        if is_archive(parent):
            return parent, path.relative_to(parent).as_posix()
    return None


@dataclass
class Archive:
    """The usable members of one archive (name -> size), what was skipped and why, and a reader."""

    path: Path
    members: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (member name, reason)
    _zip: zipfile.ZipFile | None = None
    _tar: tarfile.TarFile | None = None
    _held: dict[str, bytes] | None = None  # compressed tars: members read in one sequential pass
    _entries: dict[str, object] = field(default_factory=dict)  # name -> its ZipInfo / TarInfo (the first of a name)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, name: str) -> bytes:
        if name not in self.members:
            reason = dict(self.skipped).get(name, "no such member")
            raise FileNotFoundError(f"{self.path}/{name}: {reason}")
        with self._lock:  # one file handle per archive and process
            entry = self._entries[name]
            if self._zip is not None:
                with self._zip.open(entry) as handle:
                    return handle.read(MAX_MEMBER_BYTES + 1)[:MAX_MEMBER_BYTES]
            if self._held is None:
                self._held = self._read_all() if self.path.name.lower().endswith(COMPRESSED_TAR) else {}
            if name in self._held:
                return self._held[name]
            handle = self._tar.extractfile(entry)
            return handle.read() if handle is not None else b""

    def _read_all(self) -> dict[str, bytes]:
        held = {}
        wanted = {id(entry): name for name, entry in self._entries.items()}
        for member in self._tar:  # one sequential pass (members are the same objects the listing kept)
            name = wanted.get(id(member))
            if name is not None:
                handle = self._tar.extractfile(member)
                held[name] = handle.read() if handle is not None else b""
        return held

    # --- the folder view catalog.py walks ----------------------------------------------------------
    def files(self, prefix: str = "") -> list[str]:
        """Member names under folder `prefix` ('' = the whole archive), sorted."""
        start = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(name for name in self.members if name.startswith(start))

    def folders(self, prefix: str = "") -> list[str]:
        """Names of the folders directly under `prefix`."""
        start = prefix.rstrip("/") + "/" if prefix else ""
        return sorted({name[len(start):].split("/", 1)[0] for name in self.members
                       if name.startswith(start) and "/" in name[len(start):]})

    def is_folder(self, prefix: str) -> bool:
        return bool(self.files(prefix)) if prefix else True


def _member_problem(name: str) -> str | None:
    """Why a member name cannot be used as is (path traversal), else None."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path in the archive (path traversal): skipped"
    if ".." in pure.parts:
        return "'..' in the member's path (path traversal): skipped"
    return None


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p in JUNK_PARTS or p.startswith(".") for p in parts) or (parts and parts[-1] in JUNK_NAMES)


def _admit(archive: Archive, entry, stored: str, size: int, problem: str | None) -> None:
    name = stored
    while name.startswith("./"):  # `tar -C dir .` stores ./train/cat/1.jpg
        name = name[2:]
    if not name or _is_junk(name):
        return
    problem = problem or _member_problem(name)
    if problem is None and size > MAX_MEMBER_BYTES:
        problem = f"{size:,} bytes is over the member limit of {MAX_MEMBER_BYTES:,}"
    if problem is None and name in archive.members:
        problem = "the same name appears twice in the archive (the first is used)"
    if problem:
        archive.skipped.append((name, problem))
    else:
        archive.members[name] = size
        archive._entries[name] = entry


def _open_zip(path: Path) -> Archive:
    handle = zipfile.ZipFile(path)
    archive = Archive(path, _zip=handle)
    for info in handle.infolist():
        if info.is_dir():
            continue
        problem = None
        if info.flag_bits & 0x1:
            problem = "encrypted member (visiontune reads no passwords): skipped"
        elif info.file_size > 1_000_000 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            problem = f"compressed {info.file_size // max(info.compress_size, 1):,}:1 (zip-bomb guard): skipped"
        _admit(archive, info, info.filename, info.file_size, problem)
    return archive


def _open_tar(path: Path) -> Archive:
    if path.name.lower().endswith(COMPRESSED_TAR) and path.stat().st_size > MAX_COMPRESSED_TAR_BYTES:
        raise DataError(f"{path}: a compressed tar over {MAX_COMPRESSED_TAR_BYTES >> 30} GB has no random access; "
                        "extract it, or pack it as .zip or plain .tar")
    handle = tarfile.open(path)
    archive = Archive(path, _tar=handle)
    for member in handle:
        if member.isdir():
            continue
        problem = None if member.isfile() else "a link or device, not a file (never followed): skipped"
        _admit(archive, member, member.name, member.size, problem)
    return archive


_OPEN: dict[tuple[int, str, int, int], Archive] = {}


def open_archive(path: str | Path) -> Archive:
    """The archive at `path`, listed and checked once per process (worker processes open their own)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (os.getpid(), str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _OPEN:
        try:
            archive = _open_zip(path) if path.name.lower().endswith(".zip") else _open_tar(path)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{path}: not a readable archive ({exc}); re-download or re-pack it") from None
        total = sum(archive.members.values())
        if total > MAX_TOTAL_BYTES:
            raise DataError(f"{path}: its members add up to {total:,} bytes, over the {MAX_TOTAL_BYTES >> 30} GB limit "
                            "(zip-bomb guard); extract what you need")
        _OPEN[key] = archive
    return _OPEN[key]


def read_member(path: str | Path) -> bytes:
    """The bytes of a path inside an archive."""
    archive_path, name = split_member(path)
    return open_archive(archive_path).read(name)


def member_key(path: str | Path) -> tuple[str, int, int]:
    """(path, size, archive mtime): what a file's stat gives for the hash memo."""
    archive_path, name = split_member(path)
    archive = open_archive(archive_path)
    if name not in archive.members:
        raise FileNotFoundError(f"{path}: not a usable member of {archive_path}")
    return str(path), archive.members[name], archive_path.stat().st_mtime_ns


def text_member(path: str | Path) -> io.StringIO:
    """A text member (a labels CSV inside the archive), decoded as UTF-8 with an optional BOM."""
    return io.StringIO(read_member(path).decode("utf-8-sig"))
