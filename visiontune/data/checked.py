"""The header check, incremental and parallel: a second look at a folder re-checks only what changed.

Every labelled image is checked on the way in (header readable, not truncated, not a bomb) and hashed
(the cache's key), which means reading every byte once. On a 100,000-image folder that is the first
minute of every command, so the outcome is recorded per file — keyed by its absolute path, size and
modification time — in ``checked.sqlite`` beside the feature cache. A file whose size and mtime are
unchanged is not read again: its hash, size or refusal reason come from the record; new or changed files
are checked in threads (file reads, SHA-256 and Pillow's header parser release the GIL for most of the
work). SQLite takes care of two processes recording at once. Files inside archives are checked in memory
every time (their bytes are in the archive already read).

Set ``VISIONTUNE_CHECK_RECORD=0`` to check every file afresh.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from visiontune.data.archives import split_member
from visiontune.data.images import ImageError, content_hash, probe_and_hash, remember_hash
from visiontune.locations import default_cache_root

SCHEMA = """CREATE TABLE IF NOT EXISTS checked (
    path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, hash TEXT, width INTEGER, height INTEGER, reason TEXT)"""
#: Paths looked up per query (SQLite's default limit on host parameters is 32,766).
QUERY_ROWS = 900
#: Files checked per round: lookups, checks and records go a round at a time, so memory stays flat in the
#: folder's size (100k pending futures and rows would hold ~250 MB).
ROUND = 4096


class CheckRecord:
    """The recorded outcome of earlier header checks (`checked.sqlite`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)

    def known(self, keys: list[tuple[str, int, int]]) -> dict[str, tuple[str | None, int, int, str | None]]:
        """path -> (hash, width, height, reason) for the keys (path, size, mtime) recorded exactly so."""
        found = {}
        with self._lock:
            for start in range(0, len(keys), QUERY_ROWS):
                chunk = keys[start : start + QUERY_ROWS]
                wanted = {path: (size, mtime) for path, size, mtime in chunk}
                rows = self._db.execute(
                    f"SELECT path, size, mtime, hash, width, height, reason FROM checked WHERE path IN "
                    f"({','.join('?' * len(chunk))})", [path for path, _, _ in chunk]).fetchall()
                for path, size, mtime, digest, width, height, reason in rows:
                    if wanted.get(path) == (size, mtime):
                        found[path] = (digest, width, height, reason)
        return found

    def record(self, rows: list[tuple[str, int, int, str | None, int, int, str | None]]) -> None:
        """Store (path, size, mtime, hash, width, height, reason) rows, replacing older ones."""
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO checked VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


#: The cache folder of the command being run (`--cache-dir`), when it is not the default one.
RECORD_FOLDER: ContextVar[Path | None] = ContextVar("RECORD_FOLDER", default=None)


@contextmanager
def recorded_in(folder: Path | None) -> Iterator[None]:
    """Keep the check record in `folder` (a command's --cache-dir) while the block lists files."""
    token = RECORD_FOLDER.set(folder)
    try:
        yield
    finally:
        RECORD_FOLDER.reset(token)


def open_record() -> CheckRecord | None:
    """The record in the cache folder, or None when disabled or the folder cannot hold it (then every
    file is simply checked: the record only saves time, it never decides anything)."""
    if os.environ.get("VISIONTUNE_CHECK_RECORD", "1") == "0":
        return None
    try:
        return CheckRecord((RECORD_FOLDER.get() or default_cache_root()) / "checked.sqlite")
    except (OSError, sqlite3.Error):
        return None


def _check_one(path: Path) -> tuple[str | None, int, int, str | None]:
    """(hash, width, height, reason): reason set when the file is refused."""
    try:
        width, height = probe_and_hash(path)
    except ImageError as err:
        return None, 0, 0, err.reason
    return content_hash(path), width, height, None  # memoised by probe_and_hash: no second read


def _key(path: Path) -> tuple[str, int, int] | None:
    """(absolute path, size, mtime) of a file on disk; None inside an archive or when it cannot be stat'ed
    (then it is checked, and refused with the reason)."""
    if split_member(path) is not None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def check_files(paths: list[Path], workers: int | None = None, progress=None) -> list[str | None]:
    """The refusal reason of each file (None: usable), checking only files the record does not know as they
    are now; usable files' content hashes are remembered in-process for the cache to key them by."""
    record = open_record()
    reasons: list[str | None] = [None] * len(paths)
    rounds = range(0, len(paths), ROUND)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for start in progress(rounds, total=len(rounds)) if progress else rounds:
            chunk = list(range(start, min(start + ROUND, len(paths))))
            keys = {i: _key(paths[i]) for i in chunk}
            known = record.known([k for k in keys.values() if k is not None]) if record is not None else {}
            todo = []
            for i, key in keys.items():
                outcome = known.get(key[0]) if key is not None else None
                if outcome is None:
                    todo.append(i)
                    continue
                digest, _, _, reasons[i] = outcome
                if digest is not None:
                    remember_hash(paths[i], digest)
            fresh = []
            for i, outcome in zip(todo, pool.map(_check_one, [paths[i] for i in todo])):
                reasons[i] = outcome[3]
                if keys[i] is not None:
                    fresh.append((*keys[i], *outcome))
            if record is not None and fresh:
                record.record(fresh)
    if record is not None:
        record.close()
    return reasons
