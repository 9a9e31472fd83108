"""cache/: features stored by content hash, keys invalidate, shards are atomic and resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visiontune.backbones.registry import create_backbone
from visiontune.cache import features as features_module
from visiontune.cache.features import feature_key, cached_activations
from visiontune.cache.store import FeatureStore, cache_info, clear_cache
from visiontune.data.images import content_hash


def test_store_round_trip_and_index_survives_reopen(tmp_path):
    store = FeatureStore(tmp_path, {"arch": "a"})
    rows = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    store.add_shard([f"h{i}" for i in range(5)], rows)
    again = FeatureStore(tmp_path, {"arch": "a"})
    np.testing.assert_allclose(again.get(["h3", "h0"]), rows[[3, 0]], atol=1e-2)
    assert again.missing(["h0", "zz", "h4"]) == [1]
    assert FeatureStore(tmp_path, {"arch": "b"}).missing(["h0"]) == [0]  # another key, another store


def test_half_written_shard_does_not_count(tmp_path):
    store = FeatureStore(tmp_path, {"arch": "a"})
    np.save(store.dir / "shard-0.npy", np.zeros((2, 4), np.float16))  # killed before its hash list
    (store.dir / "shard-1.json.tmp123").write_text('["x"]')
    assert FeatureStore(tmp_path, {"arch": "a"}).missing(["x"]) == [0]


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(num_classes=3, img_size=64)


def test_features_are_reused_and_recomputed_only_for_changed_files(class_folders, tmp_path, backbone, monkeypatch):
    paths = sorted(class_folders.rglob("*.png"))[:10]
    kept, first, skipped = cached_activations(backbone, paths, tmp_path)
    assert first.shape == (10, backbone.feature_dim) and not skipped and list(kept) == list(range(10))

    computed: list[int] = []
    real = features_module.collect_outputs

    def counting(forward, chunk_paths, *args, **kwargs):
        computed.append(len(chunk_paths))
        return real(forward, chunk_paths, *args, **kwargs)

    monkeypatch.setattr(features_module, "collect_outputs", counting)
    _, second, _ = cached_activations(backbone, paths, tmp_path)
    assert computed == [] and np.array_equal(first, second)

    paths[2].write_bytes((class_folders / "green" / "green_011.png").read_bytes())  # new content
    _, third, _ = cached_activations(backbone, paths, tmp_path)
    assert computed == [] or computed == [1]
    np.testing.assert_allclose(third[2], cached_activations(backbone, [class_folders / "green" / "green_011.png"], tmp_path)[1][0])

    other = create_backbone(num_classes=3, img_size=72)
    assert feature_key(other) != feature_key(backbone)
    cached_activations(other, paths[:3], tmp_path)
    assert computed[-1] == 3  # a changed setting never reuses stale features


def test_interrupted_caching_resumes_from_finished_shards(class_folders, tmp_path, backbone, monkeypatch):
    paths = sorted(class_folders.rglob("*.png"))
    monkeypatch.setattr(features_module, "SHARD_SIZE", 8)
    real = features_module.collect_outputs
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(features_module, "collect_outputs", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        cached_activations(backbone, paths, tmp_path)
    store = FeatureStore(tmp_path, feature_key(backbone))
    assert len(store.missing([content_hash(p) for p in paths])) == len(paths) - 16

    sizes: list[int] = []

    def counting(forward, chunk_paths, *args, **kwargs):
        sizes.append(len(chunk_paths))
        return real(forward, chunk_paths, *args, **kwargs)

    monkeypatch.setattr(features_module, "collect_outputs", counting)
    kept, rows, _ = cached_activations(backbone, paths, tmp_path)
    assert sum(sizes) == len(paths) - 16 and len(kept) == len(paths)


def test_undecodable_files_are_skipped_not_cached(class_folders, tmp_path, backbone):
    paths = sorted(class_folders.rglob("*.png"))[:4]
    truncated = paths[1]
    truncated.write_bytes(truncated.read_bytes()[:200])
    kept, rows, skipped = cached_activations(backbone, paths, tmp_path)
    assert list(kept) == [0, 2, 3] and rows.shape[0] == 3
    assert [Path(s.path) for s in skipped] == [truncated]


def test_cache_info_and_clear(tmp_path):
    FeatureStore(tmp_path, {"arch": "a", "cut": "pooled", "view": "eval", "preprocessing": {"input_size": 9}}).add_shard(
        ["h"], np.ones((1, 3))
    )
    info = cache_info(tmp_path)
    assert len(info) == 1 and info[0]["rows"] == 1
    assert clear_cache(tmp_path) > 0 and cache_info(tmp_path) == []


def test_sigkilled_cache_build_resumes_without_recomputing_finished_shards(tmp_path):
    """A real kill (SIGKILL) mid-run: finished shards survive and the rerun computes only the rest."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import write_class_folders

    data = write_class_folders(tmp_path / "data", per_class=60)  # 180 images = 23 shards of 8
    cache = tmp_path / "cache"
    env = {**os.environ, "VISIONTUNE_SHARD_SIZE": "8"}
    command = [sys.executable, "-m", "visiontune.cli", "cache", "build", str(data), "--cache-dir", str(cache),
               "--img-size", "64", "--engine", "torch"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.glob("features/*/shard-*.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.read_text() for p in cache.glob("features/*/shard-*.json")}
    assert 2 <= len(finished) < 23  # killed mid-run
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = {p.name: p.read_text() for p in cache.glob("features/*/shard-*.json")}
    assert all(after[name] == text for name, text in finished.items())  # untouched
    rows = [h for text in after.values() for h in json.loads(text)["hashes"]]
    assert len(rows) == len(set(rows)) == 180  # every image once, nothing computed twice


def test_cached_rows_read_lazily_across_shards_in_any_order(tmp_path):
    store = FeatureStore(tmp_path, {"arch": "lazy"})
    rows = np.arange(5 * 2 * 3 * 3, dtype=np.float32).reshape(5, 2, 3, 3)
    store.add_shard(["a", "b", "c"], rows[:3])
    store.add_shard(["d", "e"], rows[3:])
    lazy = store.rows(["e", "a", "d", "b"])
    assert len(lazy) == 4 and lazy.shape == (4, 2, 3, 3)
    np.testing.assert_array_equal(lazy.take([3, 0, 2]), rows[[1, 4, 3]])
    np.testing.assert_array_equal(np.asarray(lazy), rows[[4, 0, 3, 1]])
    np.testing.assert_array_equal(lazy[1], rows[0])
    subset = lazy[np.array([True, False, True, False])]
    np.testing.assert_array_equal(np.asarray(subset), rows[[4, 3]])
    np.testing.assert_array_equal(store.get(["c"]), rows[[2]])
