"""Backbone activations for a list of images, through the feature store.

This is fast.ai's `precompute=True` done safely: the frozen trunk runs once per image (per key), the
head or tail then trains on the stored rows in seconds, and a later run with the same backbone, weights,
preprocessing, cut point and view skips the trunk entirely. Unlike fast.ai 0.7, augmentation is not lost:
``view=v`` stores the v-th seeded augmented version of each image, so the cached phase can see several.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visiontune.backbones.cuts import POOLED, Trunk
from visiontune.backbones.registry import Backbone
from visiontune.cache.store import CachedRows, FeatureStore
from visiontune.data.images import content_hash
from visiontune.data.transforms import augmentation
from visiontune import distributed
from visiontune.device import CPU, Device, Precision, inference_batch, loader_workers
from visiontune.files import fault_point
from visiontune.inference.engines import compile_forward
from visiontune.data.catalog import Skipped
from visiontune.inference.stream import collect_outputs
from visiontune.progress import track

#: Images per shard: small enough that a killed run loses little, large enough to keep file counts low.
SHARD_SIZE = int(os.environ.get("VISIONTUNE_SHARD_SIZE", "2048"))
#: On a GPU a shard is this many times larger (each shard starts its decoding processes anew).
GPU_SHARD_FACTOR = 8


def view_name(view: int | None) -> str:
    """`eval` for the deterministic view, `aug<v>` for the v-th augmented one."""
    return "eval" if view is None else f"aug{view}"


#: Cached views crop at least this fraction of the image: a few fixed views should each keep the object.
VIEW_MIN_SCALE = 0.5


def feature_key(
    backbone: Backbone, cut: str = POOLED, view: int | None = None, seed: int = 0, engine: str = "torch",
    aug: str = "light", device: Device = CPU,
) -> dict:
    """Everything that changes what a stored feature row means.

    On a GPU the key also names the device kind and the numeric path (fp32, bf16, fp16): rows computed in
    bf16 on a GPU never mix with fp32 rows, nor with the CPU's. On the CPU the engine already names its
    numeric path (torch and onnxruntime fp32, torch-bf16 bf16), and the key stays what it always was, so
    existing caches stay valid."""
    key = {
        "engine": engine,
        "arch": backbone.arch,
        "weights": backbone.weights_id,
        "preprocessing": backbone.preprocessing.to_dict(),
        "cut": cut,
        "view": view_name(view),
        "dtype": "float16",
    }
    if view is not None:
        key["augmentation"] = {"preset": aug, "min_scale": VIEW_MIN_SCALE, "seed": seed}
    else:  # the evaluation transform's resize: 2 = ResizeCentreCrop (rows differ from 1's by rounding)
        key["eval_resize"] = 2
    if device.accelerated and engine != "onnxruntime":
        key["device"] = device.kind
        key["numeric"] = Precision(device, engine == "torch-bf16").name
    return key


def _view_seed(digest: str, view: int, seed: int) -> int:
    """Seed of one image's augmented view: fixed by its content, the view number and the run seed."""
    return (int(digest[:12], 16) + 7919 * view + 104729 * seed) % (2**62)


def cached_activations(
    backbone: Backbone,
    paths: Sequence[Path],
    cache_root: Path,
    cut: str = POOLED,
    view: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    description: str = "features",
    engine: str = "torch",
    load: bool = True,
    aug: str = "light",
    shared: bool = False,
    device: Device = CPU,
) -> tuple[np.ndarray, CachedRows | None, list[Skipped]]:
    """(kept positions into `paths`, activations [n_kept, ...] read lazily from the store, skipped files).

    Computes only the images no finished shard holds, one shard at a time, so an interrupted run
    resumes where it stopped; memory stays flat in the number of images while caching. With
    `load=False` (warming the cache) the activations are not read back and None is returned. With
    `shared` in a distributed run (every rank calls this together), each rank computes every W-th shard of
    the missing images and all read the union after a barrier (visiontune/distributed.py).
    On a GPU (`device`) the trunk runs there, in batches sized from its free memory, fed by a decoding
    process per core.
    """
    store = FeatureStore(cache_root, feature_key(backbone, cut, view, seed, engine, aug, device))
    batch_size = inference_batch(device, backbone.preprocessing.input_size, batch_size)
    workers = loader_workers(device, workers)
    trunk = Trunk(backbone.model, cut).eval()
    forward = None  # compiled on first need: a fully cached run never exports or loads an engine
    transform = None if view is None else augmentation(backbone.preprocessing, aug, VIEW_MIN_SCALE)
    skipped: list[Skipped] = []
    hashes: list[str | None] = []
    for path in track(paths, f"hashing {description}"):
        try:
            hashes.append(content_hash(path))
        except OSError as exc:
            hashes.append(None)
            skipped.append(Skipped(str(path), f"cannot read: {exc}"))
    readable = [i for i, h in enumerate(hashes) if h is not None]
    todo_hashes: dict[str, int] = {}
    for i in readable:
        if hashes[i] not in store.index():
            todo_hashes.setdefault(hashes[i], i)
    todo = list(todo_hashes.values())
    shared = shared and distributed.active()
    if shared:  # this rank's blocks of SHARD_SIZE: every shard is written by exactly one rank
        todo = [todo[i] for i in distributed.my_blocks(len(todo), SHARD_SIZE)]
    own_skipped: list[Skipped] = []
    # a GPU runs a shard in a second or two: larger shards there, so its decoding processes start less often
    shard = SHARD_SIZE * GPU_SHARD_FACTOR if device.accelerated else SHARD_SIZE
    for start in range(0, len(todo), shard):
        chunk = todo[start : start + shard]
        chunk_skipped: list[Skipped] = []
        if forward is None:
            forward = compile_forward(trunk, engine, backbone.preprocessing.input_size, store.dir / "trunk.onnx", device)
        done, rows = collect_outputs(
            forward,
            [paths[i] for i in chunk],
            backbone.preprocessing,
            batch_size=batch_size,
            workers=workers,
            description=f"{description} ({view_name(view)}, {cut}) {start + len(chunk)}/{len(todo)} new",
            transform=transform,
            skipped=chunk_skipped,
            seeds=None if view is None else [_view_seed(hashes[i], view, seed) for i in chunk],
        )
        own_skipped.extend(chunk_skipped)
        if len(done):
            store.add_shard([hashes[chunk[j]] for j in done], rows)
            fault_point("caching")
    if shared:  # the other ranks' shards and unreadable files
        distributed.barrier()
        own_skipped = [s for part in distributed.gather(own_skipped) for s in part]
        store.forget_index()
    skipped.extend(own_skipped)
    index = store.index()
    kept = np.array([i for i in readable if hashes[i] in index], dtype=np.int64)
    return kept, store.rows([hashes[i] for i in kept]) if load else None, skipped


#: What a thumbnail row means (data/leakage.py): bump the version when `thumbnail` changes.
THUMBNAIL_KEY = {"kind": "thumbnail", "side": 32, "version": 1}


def cached_thumbnails(paths: Sequence[Path], cache_root: Path, description: str = "thumbnails") -> CachedRows:
    """The near-duplicate thumbnails of `paths` (all readable), through the feature store: decoded once per
    image content, in threads (Pillow decodes outside the GIL), a shard at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from visiontune.data.leakage import thumbnail

    store = FeatureStore(cache_root, THUMBNAIL_KEY)
    hashes = [content_hash(path) for path in paths]
    first: dict[str, int] = {}  # one decode per distinct content
    for i in store.missing(hashes):
        first.setdefault(hashes[i], i)
    todo = list(first.values())
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in track(range(0, len(todo), SHARD_SIZE), f"{description} for the near-duplicate check"):
            chunk = todo[start : start + SHARD_SIZE]
            rows = list(pool.map(thumbnail, [paths[i] for i in chunk]))
            store.add_shard([hashes[i] for i in chunk], np.stack(rows))
    return store.rows(hashes)


def trunk_engine_path(backbone: Backbone, cache_root: Path, cut: str, engine: str, seed: int = 0,
                      device: Device = CPU) -> Path:
    """Where the plain view's cache keeps the trunk exported for `engine`: timing the plan's speed exports it
    there, so caching then reuses the file instead of exporting again."""
    return FeatureStore(cache_root, feature_key(backbone, cut, None, seed, engine, device=device)).dir / "trunk.onnx"


def uncached_count(
    backbone: Backbone, paths: Sequence[Path], cache_root: Path, cut: str = POOLED, view: int | None = None,
    seed: int = 0, engine: str = "torch", aug: str = "light", device: Device = CPU,
) -> int:
    """How many of `paths` (by content) no finished shard of this key holds yet: the trunk passes a run
    will pay for. Reads nothing but the store's index (the content hashes are memoised by the catalog)."""
    key = feature_key(backbone, cut, view, seed, engine, aug, device)
    if not FeatureStore.directory(cache_root, key).is_dir():  # asking must not create an empty store
        return len(paths)
    index = FeatureStore(cache_root, key).index()
    missing = 0
    for path in paths:
        try:
            missing += content_hash(path) not in index
        except OSError:
            continue
    return missing
