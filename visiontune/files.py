"""Writing files so that a kill at any moment leaves the old file or the new one — never half of one.

Every file visiontune writes for a user or for itself (run files, the classifier, checkpoints, cache
shards, exports) is written under a hidden *partial* name beside its final name and renamed over it when
complete (`os.replace`: atomic on POSIX and Windows). A process killed mid-write (SIGKILL, power loss)
leaves only a partial file, which no reader looks at, and which the next process to open that folder
deletes once the process that wrote it is gone (`remove_stale_partials`).

`fault_point` is the hook the fault tests use: with `VISIONTUNE_FAULT=<name>` in the environment the
process sends itself SIGKILL when it reaches the point of that name — a real kill at a known moment, so
tests/test_faults.py can check every phase deterministically. Unset (always, outside those tests), it
costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visiontune.errors import WriteError

#: errno values meaning "the disk is full": ENOSPC, a quota (EDQUOT), a size limit (EFBIG, `ulimit -f`).
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: errno values meaning "this place cannot be written".
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


#: What numpy's `tofile` (under `np.save`) raises for a short write, with no errno: on a local disk, a full one.
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


_MAKE_ROOM = ("Free space on that disk or write elsewhere (--out for a run, $VISIONTUNE_CACHE for the feature cache); "
              "nothing was left half-written, so rerun (a run: visiontune train --resume RUN) once there is room.")


def write_error(path: Path, exc: OSError) -> WriteError | None:
    """The user-facing error for a failed write of `path`, or None when `exc` is not about writing."""
    if exc.errno is None and SHORT_WRITE.search(str(exc)):
        return WriteError(f"{path}: only part of it could be written ({exc}): the disk is most likely full. {_MAKE_ROOM}")
    if exc.errno in NO_ROOM:
        return WriteError(f"{path}: no room to write it ({exc.strerror}). {_MAKE_ROOM}")
    if exc.errno in NOT_WRITABLE:
        return WriteError(f"{path}: cannot be written ({exc.strerror}). Choose a folder you can write to "
                          "(--out for a run, $VISIONTUNE_CACHE for the feature cache).")
    return None


def make_folder(folder: Path) -> Path:
    """`mkdir -p folder`, with a WriteError that says what to do when it cannot be made."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (write_error(Path(folder), exc) or exc) from None
    return Path(folder)


PARTIAL = ".partial-"
_PARTIAL_NAME = re.compile(r"^\..+\.partial-(\d+)(\.[^.]*)?$")


def partial_path(path: Path) -> Path:
    """The hidden name `path` is written under: `.NAME.partial-<pid>.SUFFIX` (the suffix kept last, since
    some writers choose the format by it)."""
    return path.with_name(f".{path.name}{PARTIAL}{os.getpid()}{path.suffix}")


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """Yield a partial path beside `path`; rename it to `path` only if the block finishes, else delete it."""
    path = Path(path)
    make_folder(path.parent)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or an unwritable folder: one clear line, not a traceback
        raise (write_error(path, exc) or exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_whole(path: Path, data: bytes) -> Path:
    with written_whole(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_whole(path: Path, text: str) -> Path:
    return write_bytes_whole(path, text.encode("utf-8"))


def write_secret_whole(path: Path, text: str) -> Path:
    """`write_text_whole` for a secret (a server token): the partial file is created with mode 0600, so the
    secret is never readable by others, not even for the moment before a chmod."""
    with written_whole(path) as tmp:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
    return Path(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(folder: Path, recursive: bool = False) -> int:
    """Delete partial files in `folder` left by processes that no longer run; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*") if recursive else folder.glob(".*"):
        match = _PARTIAL_NAME.match(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when `VISIONTUNE_FAULT` names this point (fault tests only), or send
    it the signal `VISIONTUNE_FAULT_SIGNAL` names instead (SIGTERM: what a cluster sends before it kills)."""
    if os.environ.get("VISIONTUNE_FAULT") == name:
        os.kill(os.getpid(), getattr(signal, os.environ.get("VISIONTUNE_FAULT_SIGNAL", "SIGKILL")))
