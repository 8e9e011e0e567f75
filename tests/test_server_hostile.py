"""The server under abuse: zips that add up to bombs, images no training can afford, old uploads, guessing."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import httpx
from PIL import Image

from studio import auth
from studio.uploads import UploadLimits, ingest, remove_unused


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _files(root: Path) -> set[str]:
    return {path.name for path in root.rglob("*") if path.is_file()}


def test_many_members_under_the_ratio_check_stop_at_the_archive_budget_and_refused_files_are_gone(tmp_path):
    just_under = b"\0" * (1024**2)  # 1 MiB each: at the per-member ratio check's floor, so never checked alone
    archive = _zip(tmp_path / "many.zip", {"real.png": _png(32, 32)} | {f"img_{i:03d}.png": just_under
                                                                        for i in range(200)})
    limits = UploadLimits(archive_floor_bytes=8 * 1024**2)
    report = ingest([archive], tmp_path / "up", limits)
    written = sum(path.stat().st_size for path in (tmp_path / "up").iterdir())
    assert written <= 8 * 1024**2  # not 200 MiB
    refused = [item for item in report.refused if "expands to more than" in item["reason"]]
    assert len(refused) >= 190
    assert _files(tmp_path / "up") == {item["stored"] for item in report.stored}  # nothing refused is left


def test_images_training_cannot_afford_are_refused_at_upload_and_deleted(tmp_path):
    header = struct.pack(">IIBBBBB", 20, 400_000, 8, 2, 0, 0, 0)  # 8 Mpx, 20000:1, in a few bytes
    chunk = b"IHDR" + header
    data = zlib.compress(b"\0" * 16)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    needle = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
              + idat)
    archive = _zip(tmp_path / "a.zip", {"needle.png": needle, "strip.png": _png(8, 200), "ok.png": _png(32, 32)})
    report = ingest([archive], tmp_path / "up")
    reasons = {item["file"]: item["reason"] for item in report.refused}
    assert "10:1" in reasons["a.zip:needle.png"] and "10:1" in reasons["a.zip:strip.png"]
    assert _files(tmp_path / "up") == {item["stored"] for item in report.stored}
    assert report.num_images == 1


def test_unused_uploads_are_removed_after_their_time_and_used_ones_kept(tmp_path):
    uploads, outputs = tmp_path / "outputs" / "uploads", tmp_path / "outputs"
    for name in ("old-unused", "old-used", "new-unused"):
        (uploads / name).mkdir(parents=True)
        (uploads / name / "0001_a.png").write_bytes(b"x")
    (outputs / "run").mkdir()
    (outputs / "run" / "config.json").write_text(json.dumps({"dataset_path": str(uploads / "old-used")}))
    three_days_ago = time.time() - 3 * 86400
    for name in ("old-unused", "old-used"):
        os.utime(uploads / name, (three_days_ago, three_days_ago))
    removed = remove_unused(uploads, outputs)
    assert [path.name for path in removed] == ["old-unused"]
    assert sorted(path.name for path in uploads.iterdir()) == ["new-unused", "old-used"]


def test_uploads_a_queued_or_running_job_uses_are_never_removed(tmp_path):
    outputs = tmp_path / "outputs"
    uploads = outputs / "uploads"
    names = ("queued", "running", "validation", "unused")
    for name in names:
        (uploads / name).mkdir(parents=True)
        three_days_ago = time.time() - 3 * 86400
        os.utime(uploads / name, (three_days_ago, three_days_ago))
    (outputs / ".studio").mkdir(parents=True)  # the page server's own folder (studio/queue.py)
    (outputs / ".studio" / "queue.json").write_text(json.dumps([{"job_id": "j1", "output_path": str(outputs / "next"),
                                                     "config": {"dataset_path": str(uploads / "queued")}}]))
    starting = outputs / ".studio" / "jobs" / "j2"  # a job that has not written its run's config.json yet
    starting.mkdir(parents=True)
    (starting / "job_config.json").write_text(json.dumps({"training_params": {
        "dataset_path": str(uploads / "running"), "validation_dataset_path": str(uploads / "validation")}}))
    assert [path.name for path in remove_unused(uploads, outputs)] == ["unused"]
    assert sorted(path.name for path in uploads.iterdir()) == ["queued", "running", "validation"]


def _zip_with_members(path: Path, count: int) -> Path:
    """A zip of `count` empty members, its directory written directly (zipfile would take a minute)."""
    entry = struct.Struct(zipfile.structCentralDir)
    names = [f"{index:07d}.png".encode() for index in range(count)]
    directory = b"".join(entry.pack(zipfile.stringCentralDir, 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, len(name), 0,
                                    0, 0, 0, 0, 0) + name for name in names)
    end = struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, count if count < 0xFFFF else 0xFFFF,
                      count if count < 0xFFFF else 0xFFFF, len(directory), 0, 0)
    path.write_bytes(directory + end)
    return path


def test_a_zip_of_many_empty_members_is_refused_before_its_directory_is_read(tmp_path):
    from timeouts import within

    archive = _zip_with_members(tmp_path / "many.zip", 300_000)  # 2 million took the old reader minutes
    with_png = _zip(tmp_path / "ok.zip", {"ok.png": _png(32, 32)})
    report = within(20, ingest, [archive, with_png], tmp_path / "up")
    reasons = {item["file"]: item["reason"] for item in report.refused}
    assert "split it" in reasons["many.zip"] and "at most 2000 files" in reasons["many.zip"]
    assert report.num_images == 1 and len(report.refused) == 1


def test_an_upload_whose_images_are_all_damaged_is_refused_and_deleted(tmp_path):
    import pytest

    from studio.uploads import UploadError

    png = _png(64, 64)
    damaged = png[:40] + bytes(byte ^ 0xFF for byte in png[40:60]) + png[60:]  # a checksum no longer matches
    (tmp_path / "bad.png").write_bytes(damaged)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(UploadError, match="no usable image"):
        ingest([tmp_path / "bad.png", tmp_path / "cut.png"], tmp_path / "up")
    assert not (tmp_path / "up").exists()


def test_wrong_passwords_are_slowed_down_per_client():
    now = [100.0]
    throttle = auth.LoginThrottle(free=3, first_delay=1.0, max_delay=8.0, clock=lambda: now[0])
    for _ in range(3):
        throttle.failed("10.0.0.1")
    assert throttle.wait_s("10.0.0.1") == 0  # a few typos are free
    delays = []
    for _ in range(5):
        throttle.failed("10.0.0.1")
        delays.append(throttle.wait_s("10.0.0.1"))
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert throttle.wait_s("10.0.0.2") == 0  # another client is not held up
    throttle.succeeded("10.0.0.1")
    assert throttle.wait_s("10.0.0.1") == 0


def test_the_login_middleware_answers_429_without_checking_the_password_while_a_client_waits():
    checked = []

    async def login_route(scope, receive, send):
        checked.append(scope["path"])
        body = await receive()
        ok = b"password=right" in body.get("body", b"")
        await send({"type": "http.response.start", "status": 200 if ok else 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    now = [0.0]
    app = auth.ThrottledLogin(login_route, auth.LoginThrottle(free=1, first_delay=5.0, clock=lambda: now[0]))

    async def attempts() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("10.1.1.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://studio") as http:
            wrong = [await http.post("/login", data={"password": "wrong"}) for _ in range(2)]
            blocked = await http.post("/login/", data={"password": "right"})
            now[0] += 6
            allowed = await http.post("/login", data={"password": "right"})
            other = await http.post("/config")
            return [*wrong, blocked, allowed, other]

    responses = asyncio.run(attempts())
    assert [r.status_code for r in responses] == [400, 400, 429, 200, 400]
    assert responses[2].headers["retry-after"] == "5" and "try again" in responses[2].json()["detail"]
    assert len(checked) == 4  # the blocked try never reached the password check


def test_concurrent_wrong_passwords_are_counted_before_they_are_checked():
    checked = []

    async def slow_login_route(scope, receive, send):
        checked.append(scope["path"])
        await asyncio.sleep(0.05)  # the password check takes a while: every try arrives before the first answer
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    # a clock that stands still: on a loaded machine the 200 tries may take longer than the first wait
    app = auth.ThrottledLogin(slow_login_route, auth.LoginThrottle(free=3, first_delay=1.0, clock=lambda: 0.0))

    async def attempts() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("10.2.2.2", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://studio") as http:
            return await asyncio.gather(*(http.post("/login", data={"password": f"guess{index}"})
                                          for index in range(200)))

    codes = [response.status_code for response in asyncio.run(attempts())]
    assert len(checked) == 4 and codes.count(400) == 4  # the 3 free tries and one more; the rest wait
    assert codes.count(429) == 196


def test_gradio_cache_and_config_exports_are_swept_by_age_and_size(tmp_path, monkeypatch):
    from studio import cleanup

    cache, outputs, kept_target = tmp_path / "gradio", tmp_path / "outputs", tmp_path / "precious.bin"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    kept_target.write_bytes(b"keep me")
    now = time.time()
    for name, age_h, size in (("old-upload", 30, 10), ("refused-upload", 25, 10), ("big-1", 2, 600), ("big-2", 1, 600),
                              ("fresh", 0.1, 10)):
        (cache / name).mkdir(parents=True)
        (cache / name / "file.bin").write_bytes(b"x" * size)
        os.utime(cache / name, (now - age_h * 3600, now - age_h * 3600))
    (cache / "link").symlink_to(kept_target)
    os.utime(cache / "link", (now - 48 * 3600,) * 2, follow_symlinks=False)
    export = cleanup.export_folder(outputs)
    (export / "run.json").write_text("{}")
    os.utime(export, (now - 30 * 3600,) * 2)
    removed = cleanup.sweep(cache, max_age_s=24 * 3600, max_bytes=1000, now=now)
    assert sorted(path.name for path in removed) == ["big-1", "link", "old-upload", "refused-upload"]
    assert sorted(path.name for path in cache.iterdir()) == ["big-2", "fresh"] and kept_target.is_file()
    swept = cleanup.sweep_caches(outputs, now=now + 1000)
    assert export in swept and not export.exists()
    assert cleanup.sweep_caches(outputs, now=now + 1001) == []  # at most one sweep every SWEEP_EVERY_S
