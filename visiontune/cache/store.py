"""The on-disk feature store: backbone activations computed once, reused across runs and heads.

Layout: ``<root>/<key digest>/`` holds ``key.json`` (what the features mean: backbone, weights,
preprocessing, cut point, view) and shards. A shard is ``shard-<n>.npy`` (float16 rows) plus
``shard-<n>.json`` (the content hash of each row's image), written to temporary names and renamed, the
hash list last: a shard without its hash list does not exist, so a killed run leaves no half shard and the
next run recomputes only what no finished shard holds. Rows are looked up by the image's content hash,
so renaming or moving files reuses features and changing one file's bytes recomputes only that file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from visiontune.backbones.providers import file_digest
from visiontune.errors import ArtifactError
from visiontune.files import make_folder, remove_stale_partials, write_bytes_whole, written_whole


def key_digest(key: dict) -> str:
    """Stable digest of a cache key dict (sorted JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


#: Shards whose bytes matched their checksum in this process (path, size, mtime, digest): a run opens the
#: same store several times (counting what is cached, then caching each view), and a finished shard never
#: changes, so its bytes are hashed once per process, not once per opening.
_VERIFIED: set[tuple[str, int, int, str]] = set()


class FeatureStore:
    """Features for one key, addressable by image content hash."""

    def __init__(self, root: Path, key: dict):
        self.key = key
        self.dir = make_folder(self.directory(root, key))
        remove_stale_partials(self.dir)  # shards a killed process was writing
        key_file = self.dir / "key.json"
        if not key_file.exists():
            write_bytes_whole(key_file, json.dumps(key, indent=2, sort_keys=True).encode())
        self._index: dict[str, tuple[int, int]] | None = None

    @staticmethod
    def directory(root: Path, key: dict) -> Path:
        """Where the store of `key` lives under `root` (whether or not it exists yet)."""
        return Path(root) / "features" / key_digest(key)

    def _shard_ids(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("shard-*.json"))

    def index(self) -> dict[str, tuple[int, int]]:
        """content hash -> (shard id, row), over all finished shards whose bytes pass their checksum; a
        shard that fails it (truncated, bit-flipped) is deleted and its rows count as missing, so the
        caching pass recomputes them instead of training on damaged numbers."""
        if self._index is None:
            index: dict[str, tuple[int, int]] = {}
            for shard in self._shard_ids():
                hashes = self._verified_hashes(shard)
                for row, digest in enumerate(hashes):
                    index.setdefault(digest, (shard, row))
            self._index = index
        return self._index

    def forget_index(self) -> None:
        """Read the shards again at the next lookup (other processes have added some)."""
        self._index = None

    def _verified_hashes(self, shard: int) -> list[str]:
        """The image hashes of a shard, or [] (and the shard deleted) when its data is damaged."""
        meta_path, npy = self.dir / f"shard-{shard}.json", self.dir / f"shard-{shard}.npy"
        try:
            meta = json.loads(meta_path.read_text())
            if isinstance(meta, list):  # written before shards carried a checksum
                return meta
            stat = npy.stat()
            checked = (str(npy), stat.st_size, stat.st_mtime_ns, meta["sha256"])
            if checked in _VERIFIED or file_digest(npy) == meta["sha256"]:
                _VERIFIED.add(checked)
                return meta["hashes"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        from visiontune.progress import console

        console.print(f"[yellow]cache shard {npy} failed its checksum (truncated or altered on disk): deleted; "
                      "its rows are recomputed[/]")
        meta_path.unlink(missing_ok=True)
        npy.unlink(missing_ok=True)
        return []

    def _reserve_shard_id(self) -> int:
        """The next free shard id, reserved by creating `shard-<n>.reserved` exclusively (O_EXCL), so two
        processes caching into one store at once never write the same shard. Reservations stay (an empty file
        per shard): removing one after writing would let a process that listed the folder in between take
        the id again (seen in the test: a lost shard). A killed process's reservation only retires its id."""
        reserved = (int(p.stem.split("-")[1]) for p in self.dir.glob("shard-*.reserved"))
        shard = max([*self._shard_ids(), *reserved], default=-1) + 1  # shards written before reservations too
        while True:
            try:
                os.close(os.open(self.dir / f"shard-{shard}.reserved", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return shard
            except FileExistsError:
                shard += 1

    def missing(self, hashes: list[str]) -> list[int]:
        """Positions in `hashes` that no finished shard holds."""
        index = self.index()
        return [i for i, digest in enumerate(hashes) if digest not in index]

    def add_shard(self, hashes: list[str], features: np.ndarray) -> None:
        """Write one finished shard atomically (rows stored as float16)."""
        if len(hashes) != len(features):
            raise ValueError("one hash per feature row")
        shard = self._reserve_shard_id()
        with written_whole(self.dir / f"shard-{shard}.npy") as tmp:
            np.save(tmp, np.asarray(features, dtype=np.float16))
            digest = file_digest(tmp)
        write_bytes_whole(self.dir / f"shard-{shard}.json", json.dumps({"hashes": hashes, "sha256": digest}).encode())
        index = self.index()
        for row, digest in enumerate(hashes):
            index.setdefault(digest, (shard, row))

    def rows(self, hashes: list[str]) -> CachedRows:
        """Rows for `hashes` (all must be present), read lazily from the memory-mapped shards."""
        index = self.index()
        locations = np.array([index[digest] for digest in hashes], dtype=np.int64).reshape(-1, 2)
        return CachedRows(self.dir, locations)

    def get(self, hashes: list[str]) -> np.ndarray:
        """Rows (vectors or activation maps) for `hashes` as one float32 array in memory."""
        return np.asarray(self.rows(hashes))


class CachedRows:
    """Stored rows addressed by position, read on demand from memory-mapped fp16 shards.

    Training gathers one batch at a time through :meth:`take`, so memory stays flat in the number of
    images however large the cached activations are; `np.asarray(rows)` materialises everything. After
    each gather the shards' pages are dropped from this process's mapping (MADV_DONTNEED): they stay in the
    OS page cache, but an epoch over 100,000 cached rows no longer counts 250 MB of mapped file in the
    process's resident memory (bench/large_data.py measured train's peak RSS growing with the folder).
    """

    def __init__(self, directory: Path, locations: np.ndarray):
        self.directory = Path(directory)
        self.locations = locations  # [n, 2]: (shard, row)
        self._shards: dict[int, np.ndarray] = {}
        self._maps: dict[int, mmap.mmap] = {}

    def _shard(self, shard: int) -> np.ndarray:
        """Shard `shard`, memory-mapped; a file that is not a plain numeric array (an object array is a pickle)
        is refused, never unpickled (`np.load` keeps `allow_pickle=False`)."""
        if shard not in self._shards:
            path = self.directory / f"shard-{shard}.npy"
            try:
                rows, self._maps[shard] = _map_npy(path)
            except (OSError, ValueError, TypeError) as exc:  # TypeError: a header promising more rows than the file holds
                raise ArtifactError(f"{path}: not a feature shard ({exc}). visiontune never unpickles cache files; "
                                    "delete the folder (visiontune cache clear) and rerun.") from None
            if rows.dtype.kind != "f":
                raise ArtifactError(f"{path}: holds {rows.dtype} rows, not features; delete the folder "
                                    "(visiontune cache clear) and rerun.")
            self._shards[shard] = rows
        return self._shards[shard]

    def _release(self, shard: int) -> None:
        """Drop the shard's pages from this process's resident set (re-read from the page cache when needed)."""
        mapping = self._maps.get(shard)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def __len__(self) -> int:
        return len(self.locations)

    @property
    def shape(self) -> tuple[int, ...]:
        if not len(self):
            return (0,)
        return (len(self), *self._shard(int(self.locations[0, 0])).shape[1:])

    def take(self, indices) -> np.ndarray:
        """float32 rows at `indices` (in that order), gathered shard by shard."""
        picked = self.locations[np.asarray(indices, dtype=np.int64)]
        out = np.empty((len(picked), *self.shape[1:]), dtype=np.float32)
        for shard in np.unique(picked[:, 0]):
            mask = picked[:, 0] == shard
            rows = picked[mask, 1]
            order = np.argsort(rows)  # ascending reads from the memory map
            gathered = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
            gathered[order] = self._shard(int(shard))[rows[order]]
            out[mask] = gathered
            self._release(int(shard))
        return out

    def __getitem__(self, key):
        """An int gives one row (float32); a slice, index array or boolean mask gives a lazy subset."""
        if isinstance(key, (int, np.integer)):
            return self.take([int(key)])[0]
        return CachedRows(self.directory, self.locations[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)


def _map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap]:
    """A .npy file as a read-only array over a memory map this module owns (np.load's memmap keeps its map
    private); the header is parsed without unpickling (an object array is refused by the caller)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
        if dtype.hasobject:
            raise ValueError("an object array (a pickle)")
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    rows = np.ndarray(shape, dtype=dtype, buffer=mapping, offset=offset, order="F" if fortran else "C")
    return rows, mapping


def _shard_hashes(meta) -> list[str]:
    return meta if isinstance(meta, list) else meta.get("hashes", [])


def cache_info(root: Path) -> list[dict]:
    """One entry per feature key under `root`: its key, rows and bytes on disk."""
    entries = []
    for key_file in sorted((Path(root) / "features").glob("*/key.json")):
        folder = key_file.parent
        rows = sum(len(_shard_hashes(json.loads(p.read_text()))) for p in folder.glob("shard-*.json"))
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        entries.append({"dir": str(folder), "key": json.loads(key_file.read_text()), "rows": rows, "bytes": size})
    return entries


def clear_cache(root: Path) -> int:
    """Delete every stored feature under `root`; returns bytes freed."""
    folder = Path(root) / "features"
    if not folder.exists():
        return 0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder)
    return size
