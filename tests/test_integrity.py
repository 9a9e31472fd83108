"""Issue G: damaged cache shards and checkpoints are detected by checksum — recomputed or refused, never used."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from visiontune.cache.store import FeatureStore
from visiontune.errors import ArtifactError
from visiontune.train.checkpoint import Position, load_checkpoint, save_checkpoint


def flip_byte(path, offset_from_end: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit-flip", "truncate"])
def test_a_damaged_cache_shard_is_dropped_and_its_rows_count_as_missing(tmp_path, damage, capsys):
    key = {"arch": "x", "cut": "pooled"}
    store = FeatureStore(tmp_path, key)
    hashes = [f"h{i}" for i in range(6)]
    store.add_shard(hashes[:3], np.ones((3, 4)))
    store.add_shard(hashes[3:], np.full((3, 4), 2.0))
    shard = store.dir / "shard-1.npy"
    if damage == "bit-flip":
        flip_byte(shard)
    else:
        shard.write_bytes(shard.read_bytes()[:-8])
    again = FeatureStore(tmp_path, key)
    assert again.missing(hashes) == [3, 4, 5]  # recomputed by the next caching pass
    assert not shard.exists() and not (store.dir / "shard-1.json").exists()
    assert np.array_equal(again.get(hashes[:3]), np.ones((3, 4)))
    assert "failed its checksum" in capsys.readouterr().err


def test_shards_written_before_checksums_are_still_read(tmp_path):
    store = FeatureStore(tmp_path, {"k": 1})
    store.add_shard(["a", "b"], np.zeros((2, 3)))
    (store.dir / "shard-0.json").write_text(json.dumps(["a", "b"]))  # the old format: hashes only
    assert FeatureStore(tmp_path, {"k": 1}).missing(["a", "b", "c"]) == [2]


@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "missing"])
def test_a_damaged_checkpoint_is_refused_with_what_to_do(tmp_path, damage):
    module = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path, Position("head", 1, 0, 0), module, optimizer, None)
    assert load_checkpoint(tmp_path) is not None  # intact: loads
    weights = next(tmp_path.glob("last-*.safetensors"))
    if damage == "bit-flip":
        flip_byte(weights)
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-16])
    else:
        weights.unlink()
    with pytest.raises(ArtifactError, match="damaged .* Start a new run"):
        load_checkpoint(tmp_path)


def _writer(root, key, offset: int, shards: int) -> None:
    store = FeatureStore(root, key)
    for k in range(shards):
        value = offset + k
        store.add_shard([f"h{value}-{r}" for r in range(3)], np.full((3, 4), float(value)))


def test_two_processes_caching_into_one_store_never_mix_their_shards(tmp_path):
    import multiprocessing

    key = {"shared": True}
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(tmp_path, key, offset, 25)) for offset in (0, 1000)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    store = FeatureStore(tmp_path, key)
    hashes = [f"h{offset + k}-{r}" for offset in (0, 1000) for k in range(25) for r in range(3)]
    assert store.missing(hashes) == []  # every shard of both writers survived
    rows = store.get(hashes)
    expected = np.repeat([offset + k for offset in (0, 1000) for k in range(25)], 3).astype(np.float32)
    assert np.array_equal(rows[:, 0], expected)  # each hash reads its own writer's numbers
    assert len(list(store.dir.glob("shard-*.reserved"))) == 50  # one id per shard, none taken twice


def test_a_store_written_before_reservations_keeps_its_shards(tmp_path):
    store = FeatureStore(tmp_path, {"old": 1})
    store.add_shard(["a"], np.zeros((1, 2)))
    next(store.dir.glob("shard-0.reserved")).unlink()  # as an older visiontune left it
    FeatureStore(tmp_path, {"old": 1}).add_shard(["b"], np.ones((1, 2)))
    assert np.array_equal(FeatureStore(tmp_path, {"old": 1}).get(["a", "b"]), [[0, 0], [1, 1]])


def test_a_shard_is_hashed_once_per_process_however_often_the_store_is_opened(tmp_path, monkeypatch):
    from visiontune.cache import store as store_module

    FeatureStore(tmp_path, {"k": 2}).add_shard(["a"], np.zeros((1, 2)))
    calls = []
    real = store_module.file_digest
    monkeypatch.setattr(store_module, "file_digest", lambda path: calls.append(path) or real(path))
    for _ in range(3):
        assert FeatureStore(tmp_path, {"k": 2}).missing(["a"]) == []
    assert len(calls) <= 1
    shard = next(FeatureStore(tmp_path, {"k": 2}).dir.glob("shard-*.npy"))
    before = shard.stat().st_mtime_ns
    flip_byte(shard)  # altered after the check (a file system with coarse times: move its mtime on by hand)
    os.utime(shard, ns=(before + 1_000_000, before + 1_000_000))
    assert FeatureStore(tmp_path, {"k": 2}).missing(["a"]) == [0]


class Trap:
    """Unpickling this object creates a marker file: a stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path, marker) -> None:
    """Replace `path` with a pickle (torch.save's zip format) that would create `marker` if unpickled."""
    torch.save({"weights": Trap(marker)}, path)


def test_a_pickle_in_place_of_a_classifiers_weights_is_refused_unread(tmp_path):
    import timm

    from visiontune.classifier import Classifier
    from visiontune.data.transforms import Preprocessing

    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=2)
    Classifier(model=model, arch="mobilenetv3_small_050", classes=["a", "b"],
               preprocessing=Preprocessing(32, (0.5,) * 3, (0.25,) * 3)).save(tmp_path / "clf")
    plant_pickle(tmp_path / "clf" / "model.safetensors", tmp_path / "owned")
    with pytest.raises(ArtifactError, match="never unpickles"):
        Classifier.load(tmp_path / "clf")
    assert not (tmp_path / "owned").exists()


def test_a_pickle_in_place_of_a_checkpoint_is_refused_unread(tmp_path):
    module = nn.Linear(4, 2)
    save_checkpoint(tmp_path, Position("head", 1, 0, 0), module, torch.optim.SGD(module.parameters(), lr=0.1), None)
    weights = next(tmp_path.glob("last-*.safetensors"))
    plant_pickle(weights, tmp_path / "owned")
    meta = json.loads((tmp_path / "last.json").read_text())
    meta.pop("sha256")  # an attacker who edits the folder can edit the checksum too: the format must still hold
    (tmp_path / "last.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="never unpickles"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "owned").exists()


def test_a_pickle_in_place_of_a_cache_shard_is_refused_unread(tmp_path):
    from visiontune.backbones.providers import file_digest

    store = FeatureStore(tmp_path, {"k": 1})
    store.add_shard(["a", "b"], np.zeros((2, 3)))
    shard = store.dir / "shard-0.npy"
    np.save(shard, np.array([Trap(tmp_path / "owned"), None], dtype=object), allow_pickle=True)
    (store.dir / "shard-0.json").write_text(json.dumps({"hashes": ["a", "b"], "sha256": file_digest(shard)}))
    with pytest.raises(ArtifactError, match="never unpickles"):
        FeatureStore(tmp_path, {"k": 1}).get(["a", "b"])
    assert not (tmp_path / "owned").exists()


def test_a_truncated_shard_without_a_checksum_is_refused_with_what_to_do(tmp_path):
    """Shards from before checksums are read unverified; one cut short is refused, not a traceback."""
    from visiontune.cache.store import CachedRows

    np.save(tmp_path / "shard-0.npy", np.ones((100, 8), np.float16))
    (tmp_path / "shard-0.npy").write_bytes((tmp_path / "shard-0.npy").read_bytes()[:300])
    with pytest.raises(ArtifactError, match="not a feature shard.*cache clear"):
        CachedRows(tmp_path, np.array([[0, 1]])).take([0])


def test_a_short_write_without_errno_is_a_full_disk_message_and_leaves_nothing(tmp_path, monkeypatch):
    """numpy's `tofile` (under np.save) reports a short write as `OSError: N requested and M written` with no
    errno (seen on a full disk under the feature cache): one clear line naming the shard, not a traceback, and
    no partial file or half shard left."""
    from visiontune.errors import WriteError

    store = FeatureStore(tmp_path, {"k": "short-write"})

    def short_save(path, array):
        with open(path, "wb") as handle:
            handle.write(b"\x93NUMPY" + b"\0" * 100)
        raise OSError(f"{array.nbytes} requested and 106 written")

    monkeypatch.setattr(np, "save", short_save)
    with pytest.raises(WriteError, match=r"shard-0\.npy: only part of it could be written .*most likely full"):
        store.add_shard(["a" * 32, "b" * 32], np.ones((2, 4), dtype=np.float32))
    assert not [p.name for p in store.dir.iterdir() if ".partial-" in p.name or p.name in ("shard-0.npy", "shard-0.json")]
