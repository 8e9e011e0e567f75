"""Hostile and ordinary uploads: everything lands in the upload folder under server-chosen names."""

from __future__ import annotations

import io
import re
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from lora_core import dataset
from studio.uploads import UploadError, UploadLimits, ingest

SERVER_NAME = re.compile(r"^\d{4}_[A-Za-z0-9_-]+\.(png|jpg|jpeg|webp|bmp|txt)$")


def png_bytes(color: str = "red", size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(path: Path, members: dict[str, bytes], *, symlinks: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return path


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file() or path.is_symlink()}


def test_loose_images_and_captions_pair_under_server_names(tmp_path: Path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / "my cat (1).png").write_bytes(png_bytes())
    (incoming / "my cat (1).txt").write_text("a cat on a sofa", encoding="utf-8")
    (incoming / "dog.png").write_bytes(png_bytes("blue"))
    (incoming / "orphan.txt").write_text("no image", encoding="utf-8")
    (incoming / "run.sh").write_text("rm -rf /", encoding="utf-8")
    dest = tmp_path / "upload"

    report = ingest(sorted(incoming.iterdir()), dest)

    assert sorted(path.name for path in dest.iterdir()) == ["0001_dog.png", "0002_my_cat_1.png", "0002_my_cat_1.txt"]
    refused = {item["file"]: item["reason"] for item in report.refused}
    assert "caption without an image" in refused["orphan.txt"]
    assert "not an image or caption" in refused["run.sh"]
    scanned = dataset.scan(dest, ["cat"])
    captions = {Path(record.path).name: record.caption for record in scanned.images}
    assert captions["0002_my_cat_1.png"] == "cat, a cat on a sofa"
    assert report.num_images == 2 and report.num_captions == 1


def test_hostile_zip_members_are_refused_and_nothing_escapes(tmp_path: Path):
    archive = make_zip(tmp_path / "set.zip", {
        "good/a.png": png_bytes(),
        "good/a.txt": b"caption a",
        "../escape.png": png_bytes(),
        "good/../../escape2.png": png_bytes(),
        "/etc/absolute.png": png_bytes(),
        "C:/Windows/drive.png": png_bytes(),
        "..\\backslash.png": png_bytes(),
        "link.png": b"/etc/passwd",
        "inner.zip": make_zip(tmp_path / "inner.zip", {"x.png": png_bytes()}).read_bytes(),
        "disguised.png": (tmp_path / "inner.zip").read_bytes(),
        "payload.tar.gz": b"\x1f\x8b" + b"0" * 20,
        "notes.pdf": b"%PDF-1.4",
        "bomb.png": b"\0" * (8 * 1024 * 1024),
    }, symlinks=("link.png",))
    dest = tmp_path / "upload"
    before = files_under(tmp_path)

    report = ingest([archive], dest)

    assert files_under(tmp_path) - before == {dest / "0001_a.png", dest / "0001_a.txt"}  # nothing else, anywhere
    assert all(SERVER_NAME.match(path.name) for path in dest.iterdir())
    reasons = {item["file"].split(":", 1)[1]: item["reason"] for item in report.refused}
    assert "traversal" in reasons["../escape.png"]
    assert "traversal" in reasons["good/../../escape2.png"]
    assert "traversal" in reasons["..\\backslash.png"]
    assert "absolute" in reasons["/etc/absolute.png"]
    assert "drive" in reasons["C:/Windows/drive.png"]
    assert "symbolic link" in reasons["link.png"]
    assert "nested archives" in reasons["inner.zip"]
    assert "nested archives" in reasons["disguised.png"]
    assert "nested archives" in reasons["payload.tar.gz"]
    assert "not an image" in reasons["notes.pdf"]
    assert "zip bomb" in reasons["bomb.png"]


def test_member_count_and_size_caps(tmp_path: Path):
    archive = make_zip(tmp_path / "many.zip", {f"img_{i:02d}.png": png_bytes() for i in range(12)})
    report = ingest([archive], tmp_path / "a", UploadLimits(max_files=5))
    assert report.num_images == 5
    assert sum("over the limit of 5 files" in item["reason"] for item in report.refused) == 7

    one = len(png_bytes())
    report = ingest([archive], tmp_path / "b", UploadLimits(max_total_bytes=3 * one))
    assert report.num_images == 3
    assert any("in total" in item["reason"] for item in report.refused)

    with pytest.raises(UploadError, match="over the limit of"):
        ingest([archive], tmp_path / "c", UploadLimits(max_file_bytes=one - 1))


def test_non_utf8_names_are_stored_under_safe_names(tmp_path: Path):
    archive = make_zip(tmp_path / "latin.zip", {"cafX.png": png_bytes(), "cafX.txt": b"coffee"})
    raw = archive.read_bytes().replace(b"cafX", b"caf\xe9")  # latin-1 bytes, no UTF-8 flag
    archive.write_bytes(raw)

    report = ingest([archive], tmp_path / "upload")

    assert sorted(path.name for path in (tmp_path / "upload").iterdir()) == ["0001_caf.png", "0001_caf.txt"]
    assert any("not UTF-8" in note for note in report.notes)


def test_whole_upload_refusals(tmp_path: Path):
    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"this is not a zip")
    with pytest.raises(UploadError, match="not a readable .zip"):
        ingest([not_zip], tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(UploadError, match="no files"):
        ingest([], tmp_path / "b")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(UploadError, match="not empty"):
        ingest([not_zip], full)


def test_loose_symlink_is_refused(tmp_path: Path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    link = tmp_path / "innocent.png"
    link.symlink_to(secret)
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    report = ingest([link, good], tmp_path / "upload")
    assert [item["stored"] for item in report.stored] == ["0001_good.png"]
    assert "symbolic link" in report.refused[0]["reason"]
