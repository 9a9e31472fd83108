"""data/catalog.py and data/split.py: layouts, skips with reasons, one-line errors, stratified splits."""

from __future__ import annotations

import os

from pathlib import Path

import pytest
from conftest import write_class_folders

from visiontune.data.catalog import DataError, discover
from visiontune.data.split import split_catalog, stratified_split, write_split_folders


def test_class_folders_with_bad_files_are_skipped_and_counted(class_folders):
    (class_folders / "red" / "zero.jpg").write_bytes(b"")
    (class_folders / "red" / "notes.txt").write_text("hello")
    (class_folders / "blue" / "fake.png").write_text("not a png")
    (class_folders / "blue" / ".DS_Store").write_bytes(b"\0\0")
    source = discover(class_folders)
    assert source.layout == "folders"
    assert source.classes == ["blue", "green", "red"]
    assert source.train.class_counts() == {"blue": 12, "green": 12, "red": 12}
    reasons = {os.path.basename(s.path): s.reason for s in source.skipped}
    assert set(reasons) == {"zero.jpg", "notes.txt", "fake.png"}
    assert "empty" in reasons["zero.jpg"] and "not an image" in reasons["notes.txt"]


def test_train_val_layout(tmp_path):
    write_class_folders(tmp_path / "train", per_class=6)
    write_class_folders(tmp_path / "val", per_class=2, seed=1)
    source = discover(tmp_path)
    assert source.layout == "split"
    assert len(source.train) == 18 and len(source.valid) == 6
    assert source.valid.classes == source.train.classes


def test_valid_folder_with_unknown_class_is_an_error(tmp_path):
    write_class_folders(tmp_path / "train", per_class=3)
    write_class_folders(tmp_path / "valid", per_class=1, classes={"purple": (90, 0, 90)})
    with pytest.raises(DataError, match="purple"):
        discover(tmp_path)


def test_labels_csv(class_folders):
    csv_path = class_folders / "labels.csv"
    rows = ["filename,label"] + [f"red/red_{i:03d}.png,warm" for i in range(4)]
    rows += [f"blue/blue_{i:03d},cold" for i in range(4)]  # no extension: resolved
    csv_path.write_text("\n".join(rows) + "\n")
    source = discover(class_folders, labels=csv_path)
    assert source.layout == "csv" and source.classes == ["cold", "warm"] and len(source.train) == 8


def test_csv_naming_missing_files_stops(class_folders):
    csv_path = class_folders / "labels.csv"
    csv_path.write_text("filename,label\nred/red_000.png,a\nnope.png,b\n")
    with pytest.raises(DataError, match="1 of 2 files named in the CSV are missing"):
        discover(class_folders, labels=csv_path)


@pytest.mark.parametrize("case", ["empty", "single", "no_usable", "missing"])
def test_unusable_data_stops_with_one_line(tmp_path, case):
    root = tmp_path / "d"
    root.mkdir()
    if case == "single":
        write_class_folders(root, per_class=3, classes={"only": (1, 2, 3)})
    if case == "no_usable":
        write_class_folders(root, per_class=3)
        (root / "broken").mkdir()
        (root / "broken" / "a.jpg").write_bytes(b"garbage")
    if case == "missing":
        root = tmp_path / "does-not-exist"
    with pytest.raises(DataError) as info:
        discover(root)
    message = str(info.value)
    assert "\n" not in message and str(root) in message
    expected = {"empty": "no image files found", "single": "only one class", "no_usable": "broken", "missing": "no such"}
    assert expected[case] in message


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = [0] * 50 + [1] * 10 + [2] * 1
    train, valid = stratified_split(labels, 0.2, seed=3)
    assert stratified_split(labels, 0.2, seed=3) == (train, valid)
    assert stratified_split(labels, 0.2, seed=4) != (train, valid)
    assert sorted(train + valid) == list(range(61))
    valid_labels = [labels[i] for i in valid]
    assert valid_labels.count(0) == 10 and valid_labels.count(1) == 2 and valid_labels.count(2) == 0


def test_split_command_links_without_copying(class_folders, tmp_path):
    source = discover(class_folders)
    dest = tmp_path / "split"
    result = write_split_folders(source.train, class_folders, dest, 0.25, seed=0)
    assert result == {"train": 27, "valid": 9, "links": {"hardlink": 36}}
    linked = next((dest / "valid" / "red").iterdir())
    assert linked.stat().st_ino == (class_folders / "red" / linked.name).stat().st_ino
    resplit = discover(dest)
    assert resplit.layout == "split" and len(resplit.valid) == 9
    train, valid = split_catalog(source.train, 0.25, 0)
    assert {p.name for p in valid.paths} == {p.name for p in resplit.valid.paths}
    with pytest.raises(DataError, match="not empty"):
        write_split_folders(source.train, class_folders, dest, 0.25, seed=0)


def test_images_without_class_folders_are_named_as_such(tmp_path):
    """A flat folder of images: the message says the images are there and how to give their classes."""
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    assert "5 images are directly in this folder" in str(info.value) and "--labels" in str(info.value)


def test_a_truncated_image_is_skipped_once_by_the_catalog(tmp_path):
    """The header check alone passes truncated PNG/JPEG files that fail later; the catalog must refuse them
    up front so train and doctor count the same images (issue K)."""
    import numpy as np
    from PIL import Image

    write_class_folders(tmp_path, per_class=4)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        path = tmp_path / "red" / name
        Image.fromarray(noise).save(path, fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    source = discover(tmp_path)
    reasons = {Path(s.path).name: s.reason for s in source.skipped}
    assert "truncated PNG" in reasons["cut.png"] and "truncated JPEG" in reasons["cut.jpg"]
    assert len(source.train) == 12


def test_a_second_check_of_a_folder_reads_only_new_or_changed_files(class_folders, monkeypatch):
    """The header-check record (data/checked.py): unchanged files are not read again, changed ones are,
    and the outcome is the same as checking everything afresh."""
    from visiontune.data import checked

    (class_folders / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    first = discover(class_folders)
    calls = []
    original = checked.probe_and_hash
    monkeypatch.setattr(checked, "probe_and_hash", lambda path: calls.append(path) or original(path))
    again = discover(class_folders)
    assert calls == [] and again.train.paths == first.train.paths and again.train.skipped == first.train.skipped
    changed = class_folders / "green" / "green_003.png"
    changed.write_bytes(changed.read_bytes()[:40])  # truncated since the last check
    third = discover(class_folders)
    assert calls == [changed] and changed not in third.train.paths
    assert [s.reason for s in third.train.skipped if s.path == str(changed)] == [checked._check_one(changed)[3]]
    monkeypatch.setenv("VISIONTUNE_CHECK_RECORD", "0")
    fresh = discover(class_folders)
    assert fresh.train.paths == third.train.paths and fresh.train.skipped == third.train.skipped


def test_the_check_record_lives_in_the_cache_folder_the_command_was_given(class_folders, tmp_path):
    """`--cache-dir DIR` keeps everything the run caches in DIR, the header-check record too."""
    import os

    from visiontune.data.checked import recorded_in

    given = tmp_path / "given-cache"
    with recorded_in(given):
        discover(class_folders)
    assert (given / "checked.sqlite").exists()
    assert not (Path(os.environ["VISIONTUNE_CACHE"]) / "checked.sqlite").exists()
    discover(class_folders)
    assert (Path(os.environ["VISIONTUNE_CACHE"]) / "checked.sqlite").exists()
