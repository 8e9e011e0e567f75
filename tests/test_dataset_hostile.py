"""Dataset folders built to hang or exhaust the scan: each hostile file is one refused file, quickly."""

from __future__ import annotations

import os
import signal
import socket
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from lora_core import dataset
from lora_core.dataset import DatasetError, open_regular, scan


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) when the scan blocks for more than 10 seconds."""
    def expired(_signum, _frame):
        raise TimeoutError("the scan blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _png_claiming(path: Path, width: int, height: int) -> None:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\x00" * 16)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat)


def _refused(report) -> dict[str, str]:
    return {item["file"]: item["reason"] for item in report.refused}


def test_special_files_and_link_loops_are_refused_by_name_without_blocking(dataset_dir, deadline):
    os.mkfifo(dataset_dir / "pipe.png")
    os.mkfifo(dataset_dir / "shape_01.txt.fifo")  # not an image name: ignored, never opened
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(dataset_dir / "sock.jpg"))
    os.symlink(dataset_dir / "loop_b.png", dataset_dir / "loop_a.png")
    os.symlink(dataset_dir / "loop_a.png", dataset_dir / "loop_b.png")
    os.symlink(dataset_dir / "nothing.png", dataset_dir / "dangling.png")
    try:
        report = scan(dataset_dir, ["t"])
    finally:
        server.close()
    refused = _refused(report)
    assert "named pipe" in refused["pipe.png"] and "socket" in refused["sock.jpg"]
    assert refused["loop_a.png"] == refused["loop_b.png"] == "a symbolic link loop"
    assert "dangling" in refused["dangling.png"]
    assert len(report.images) == 6


def test_a_device_is_never_read():
    with pytest.raises(ValueError, match="a character device"):
        open_regular(Path("/dev/zero"))


def test_captions_that_are_pipes_or_links_out_of_the_folder_are_not_read(dataset_dir, tmp_path, deadline):
    (dataset_dir / "shape_01.txt").unlink()
    os.mkfifo(dataset_dir / "shape_01.txt")
    secret = tmp_path / "secret.txt"
    secret.write_text("password123", encoding="utf-8")
    (dataset_dir / "shape_02.txt").unlink()
    os.symlink(secret, dataset_dir / "shape_02.txt")
    report = scan(dataset_dir, ["t"])
    by_name = {Path(r.path).name: r for r in report.images}
    assert by_name["shape_01.png"].caption == "t" and not by_name["shape_01.png"].caption_file
    assert "password123" not in by_name["shape_02.jpg"].caption
    assert any("shape_01.txt" in w and "named pipe" in w for w in report.warnings)
    assert any("shape_02.txt" in w and "outside" in w for w in report.warnings)


def test_extreme_aspect_ratios_are_refused_before_decoding(dataset_dir):
    _png_claiming(dataset_dir / "needle.png", 4, 300_000)  # tiny file; 1.2 Mpx, so under the pixel limit
    Image.new("RGB", (8, 100)).save(dataset_dir / "strip.png")
    Image.new("RGB", (80, 8)).save(dataset_dir / "wide_ok.png")  # exactly 10:1 is allowed
    report = scan(dataset_dir, ["t"])
    refused = _refused(report)
    assert "too small" in refused["needle.png"] or "10:1" in refused["needle.png"]
    assert "10:1" in refused["strip.png"] and "Crop" in refused["strip.png"]
    assert "wide_ok.png" in {Path(r.path).name for r in report.images}
    assert dataset.size_problem(20, 300_000) is not None  # both sides over the minimum, ratio far over


def test_resizing_is_bounded_where_the_memory_is_spent(monkeypatch):
    monkeypatch.setattr(dataset, "MAX_PIXELS", 100_000)
    with pytest.raises(DatasetError, match="would be resized to 512x1024"):
        dataset.resize_and_crop(Image.new("RGB", (16, 32)), 512)


def test_huge_captions_are_cut_quickly_with_a_warning_naming_the_file(dataset_dir):
    tags = ", ".join(f"tag{i}" for i in range(300_000))  # ~2.7 MB, 300,000 tags
    (dataset_dir / "shape_01.txt").write_text(tags, encoding="utf-8")
    (dataset_dir / "shape_02.txt").write_text("x" * 5_000_000, encoding="utf-8")
    report = scan(dataset_dir, ["t"])
    by_name = {Path(r.path).name: r for r in report.images}
    for name in ("shape_01.png", "shape_02.jpg"):
        caption = by_name[name].caption
        assert len(caption) <= dataset.MAX_CAPTION_CHARS + 10 and len(caption.split(",")) <= dataset.MAX_TAGS + 1
    assert by_name["shape_01.png"].caption.startswith("t, tag0, tag1")
    assert not by_name["shape_01.png"].caption.endswith(",")
    assert [w.split(":")[0] for w in report.warnings] == ["shape_01.txt", "shape_02.txt"]


def test_limit_caption_keeps_a_short_caption_as_it_is():
    assert dataset.limit_caption("  red  circle,\n blue ") == ("red circle, blue", False)


def test_the_tag_frequency_header_is_capped_to_the_most_frequent_tags():
    from lora_core.lora import MAX_TAG_CHARS, MAX_TAG_FREQUENCY, tag_frequency

    captions = ["common, " + ", ".join(f"rare{i}_{j}" for j in range(200)) for i in range(50)] + ["y" * 10_000]
    counts = tag_frequency(captions)
    assert len(counts) == MAX_TAG_FREQUENCY and counts["common"] == 50
    assert max(len(tag) for tag in counts) <= MAX_TAG_CHARS


def test_a_page_scan_reads_sizes_from_headers_and_never_decodes_a_huge_16_bit_png_whole(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("I;16", (7000, 7000), 40000).save(folder / "huge.png", compress_level=1)  # 98 MB decoded
    truncated = (folder / "huge.png").read_bytes()
    (folder / "cut.png").write_bytes(truncated[: len(truncated) // 2])
    Image.new("RGB", (64, 48), "red").save(folder / "small.jpg")
    code = ("import resource, sys; from lora_core import dataset; before = resource.getrusage("
            "resource.RUSAGE_SELF).ru_maxrss; report = dataset.scan(sys.argv[1], ['t'], decode=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "
            "[(r.width, r.height) for r in report.images], [r['file'] for r in report.refused])")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent, check=True).stdout.split(" ", 1)
    grown_kib, rest = int(out[0]), out[1]
    assert "(7000, 7000), (64, 48)" in rest and "cut.png" in rest  # sizes right, the damaged file refused
    assert grown_kib < 60 * 1024, f"the scan grew the process by {grown_kib // 1024} MB"  # a decode: 100s of MB
    for mode in ("I;16", "P", "1", "RGB"):  # a thumbnail is decoded downscaled whatever the mode
        Image.new(mode, (1200, 900)).save(tmp_path / "mode.png")
        assert dataset.open_image(tmp_path / "mode.png", max_side=192).size == (400, 300)  # 1/3: still >= 2 x 192
