"""Issue J: archives as data — images read in place from .zip/.tar(.gz), hostile archives handled."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import visiontune as vt
from conftest import run_cli, write_class_folders
from visiontune.data.archives import split_member
from visiontune.data.catalog import DataError, discover


def zip_folder(folder: Path, target: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return target


def tar_folder(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as archive:
        archive.add(folder, arcname=".", recursive=True)
    return target


def flag_encrypted(path: Path, name: str) -> None:
    """Set the 'encrypted' bit of one member in its local header and central-directory entry (what a
    password-protected zip carries; the standard library cannot write one)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        data[archive.getinfo(name).header_offset + 6] |= 0x1
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        length = int.from_bytes(data[start + 28 : start + 30], "little")
        if data[start + 46 : start + 46 + length] == name.encode():
            data[start + 8] |= 0x1
        start += 4
    path.write_bytes(bytes(data))


def files_outside(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_a_zip_of_class_folders_is_catalogued_in_place(tmp_path):
    data = write_class_folders(tmp_path / "folder", per_class=6)
    archive = zip_folder(data, tmp_path / "data.zip")
    source = discover(archive)
    assert source.layout == "folders" and source.train.classes == ["blue", "green", "red"] and len(source.train) == 18
    assert all(split_member(p) == (archive, p.relative_to(archive).as_posix()) for p in source.train.paths)
    assert not source.skipped
    assert not (tmp_path / "data").exists()  # nothing extracted


def test_a_tar_gz_with_train_and_valid_and_a_zip_with_a_labels_csv(tmp_path):
    root = tmp_path / "split"
    write_class_folders(root / "train", per_class=5)
    write_class_folders(root / "valid", per_class=3, seed=1)
    source = discover(tar_folder(root, tmp_path / "split.tar.gz"))
    assert source.layout == "split" and len(source.train) == 15 and len(source.valid) == 9

    flat = tmp_path / "flat"
    write_class_folders(flat, per_class=4)
    rows = "\ufefffile,label\n" + "".join(f"{p.relative_to(flat).as_posix()},{p.parent.name}\n" for p in sorted(flat.rglob("*.png")))
    archive = zip_folder(flat, tmp_path / "csv.zip", {"labels.csv": rows.encode()})
    source = discover(archive, labels=archive / "labels.csv")
    assert source.layout == "csv" and len(source.train) == 12


def test_hostile_members_are_skipped_with_their_reason_and_never_read(tmp_path):
    data = write_class_folders(tmp_path / "folder", per_class=5)
    good = (data / "red" / "red_000.png").read_bytes()
    target = tmp_path / "hostile.zip"
    zip_folder(data, target, {
        "../../evil.png": good, "/abs/evil.png": good, "red/bomb.png": b"\0" * 5_000_000,
        "__MACOSX/red/._red_000.png": b"junk", "red/.DS_Store": b"junk", "Thumbs.db": b"junk",
    })
    with zipfile.ZipFile(target, "a") as archive:  # a member to flag as encrypted, and a repeated name
        archive.writestr("green/secret.png", good)
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("blue/blue_000.png", good)
    flag_encrypted(target, "green/secret.png")
    before = files_outside(tmp_path)
    source = discover(target)
    reasons = {Path(s.path).name: s.reason for s in source.skipped}
    assert "path traversal" in reasons["evil.png"]
    assert "zip-bomb guard" in reasons["bomb.png"] and "encrypted" in reasons["secret.png"]
    assert "appears twice" in reasons["blue_000.png"]
    assert source.train.classes == ["blue", "green", "red"]  # __MACOSX is not a class
    assert not any("._" in s.path or "DS_Store" in s.path or "Thumbs" in s.path for s in source.skipped)
    assert len(source.train) == 15
    assert files_outside(tmp_path) == before  # nothing written anywhere


def test_links_in_a_tar_are_not_followed(tmp_path):
    data = write_class_folders(tmp_path / "folder", per_class=4)
    target = tmp_path / "links.tar"
    with tarfile.open(target, "w") as archive:
        archive.add(data, arcname=".", recursive=True)
        link = tarfile.TarInfo("red/passwd.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    source = discover(target)
    assert any(Path(s.path).name == "passwd.png" and "never followed" in s.reason for s in source.skipped)
    assert len(source.train) == 12


def test_a_broken_archive_is_one_clear_error(tmp_path):
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match="not a readable archive"):
        discover(broken)


def test_train_predict_and_evaluate_read_the_archive(tmp_path):
    data = write_class_folders(tmp_path / "folder", per_class=10)
    archive = zip_folder(data, tmp_path / "photos.zip")
    clf = vt.fit(archive, out=tmp_path / "run", img_size=64, epochs=4, report=False, head="linear")
    same = vt.fit(data, out=tmp_path / "from-folder", img_size=64, epochs=4, report=False, head="linear")
    a, b = clf.model.state_dict(), same.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the archive trains exactly what the folder does
    assert clf.metrics["accuracy"] == same.metrics["accuracy"]
    metrics = vt.evaluate(clf, archive)
    assert metrics["n"] == 30
    out = run_cli("predict", str(tmp_path / "run"), str(archive / "red"), "--json", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    assert '"label": "red"' in (tmp_path / "p.json").read_text()
    refused = run_cli("split", str(archive), str(tmp_path / "out"))
    assert refused.returncode != 0 and "extract it first" in refused.stderr
