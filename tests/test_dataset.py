"""The dataset scan: every file gets a verdict, hostile images are refused by name, none crashes."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_core import dataset
from lora_core.dataset import DatasetError, build_caption, open_image, resize_and_crop, scan


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims a size (a decompression bomb needs no real pixels to be refused)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat_data = zlib.compress(b"\x00" * 16)
    idat = struct.pack(">I", len(idat_data)) + b"IDAT" + idat_data + struct.pack(">I", zlib.crc32(b"IDAT" + idat_data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat)


def _refused(report) -> dict[str, str]:
    return {item["file"]: item["reason"] for item in report.refused}


def test_demo_dataset_scans_with_captions_and_trigger_words(dataset_dir):
    report = scan(dataset_dir, ["shapestyle"])
    assert len(report.images) == 6 and report.captioned == 5 and not report.refused
    by_name = {Path(r.path).name: r for r in report.images}
    assert by_name["shape_01.png"].caption == "shapestyle, red circle on a blue background"
    assert by_name["shape_06.jpg"].caption == "shapestyle"  # no .txt: the trigger word is the caption
    assert by_name["shape_01.png"].caption_file and not by_name["shape_06.jpg"].caption_file


def test_caption_building():
    assert build_caption(["a", "b"], "  x \n y ") == "a, b, x y"
    assert build_caption(["a"], "") == "a"


def test_hostile_files_are_refused_by_name_and_the_rest_used(dataset_dir):
    (dataset_dir / "empty.png").write_bytes(b"")
    (dataset_dir / "text.jpg").write_text("I am not an image", encoding="utf-8")
    good = (dataset_dir / "shape_01.png").read_bytes()
    (dataset_dir / "truncated.png").write_bytes(good[: len(good) // 2])
    _png_claiming(dataset_dir / "bomb.png", 20_000, 20_000)
    Image.new("RGB", (1, 1)).save(dataset_dir / "dot.png")
    (dataset_dir / "notes.md").write_text("ignored", encoding="utf-8")
    report = scan(dataset_dir, ["t"])
    refused = _refused(report)
    assert set(refused) == {"empty.png", "text.jpg", "truncated.png", "bomb.png", "dot.png"}
    assert "not a readable image" in refused["text.jpg"]
    assert "Mpx limit" in refused["bomb.png"]
    assert "too small" in refused["dot.png"]
    assert "truncated" in refused["truncated.png"] or "damaged" in refused["truncated.png"]
    assert report.ignored == ["notes.md"]
    assert len(report.images) == 6


def test_no_usable_image_is_an_error_before_any_model_loads(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"no usable image.*a\.png"):
        scan(tmp_path, ["t"])
    with pytest.raises(DatasetError, match="not a folder"):
        scan(tmp_path / "missing", ["t"])


GRADIENT = np.linspace(0, 255, 64 * 64, dtype=np.float64).reshape(64, 64)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_every_mode_becomes_8bit_rgb(tmp_path, mode):
    if mode == "I;16":
        image = Image.fromarray((GRADIENT * 257).astype(np.uint16))  # a 16-bit PNG
        assert image.mode == "I;16"
    else:
        image = Image.fromarray(GRADIENT.astype(np.uint8)).convert(mode)
    path = tmp_path / f"image{'.png' if mode != 'CMYK' else '.jpg'}"
    image.save(path)
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    values = np.asarray(rgb)
    if mode != "CMYK":
        assert values.min() <= 2 and values.max() >= 250, "16-bit and grey images keep their full range"


def test_32bit_integer_images_are_rescaled_not_clipped():
    rgb = dataset.to_rgb(Image.fromarray((GRADIENT * 257).astype(np.int32)))
    assert np.asarray(rgb).max() >= 250 and np.asarray(rgb).min() <= 2


def test_transparency_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    image.save(tmp_path / "clear.png")
    assert np.asarray(open_image(tmp_path / "clear.png")).min() == 255
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    assert np.asarray(open_image(tmp_path / "palette.png")).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = open_image(tmp_path / "rotated.jpg")
    assert upright.size == (30, 60)
    assert np.asarray(upright)[:25].mean() > 200  # the white half is now on top


def test_animated_webp_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    pixel = np.asarray(open_image(tmp_path / "anim.webp"))[16, 16]
    assert pixel[0] > 200 and pixel[2] < 50


def test_pixels_are_resized_centre_cropped_and_scaled(tmp_path):
    image = Image.new("RGB", (400, 200), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 300, 200))  # white centre square
    image.save(tmp_path / "wide.png")
    record = dataset.ImageRecord(str(tmp_path / "wide.png"), "c", 400, 200, False)
    pixels = np.asarray(resize_and_crop(open_image(Path(record.path)), 256))
    assert pixels.shape == (256, 256, 3)
    assert pixels.mean() > 250  # the centre crop is the white square


def test_symlink_out_of_the_dataset_is_refused(dataset_dir, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    (dataset_dir / "link.png").symlink_to(outside)
    assert "outside the dataset folder" in _refused(scan(dataset_dir, ["t"]))["link.png"]
