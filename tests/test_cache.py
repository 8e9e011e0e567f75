"""Caching: latents in memory or on disk give the same training; the disk cache is reused while nothing it
depends on changes and missed when anything does; text embeddings are cached when captions are fixed."""

from __future__ import annotations

import pytest
import torch
from helpers import step_data, tiny_config
from PIL import Image
from safetensors.torch import load_file

from lora_core import models
from lora_core.conditioning import CachedConditioning, EncodedConditioning
from lora_core.config import ConfigError, parse_config
from lora_core.training import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd():
    source = models.resolve("builtin:tiny-sd")
    info = models.inspect(source)
    return models.load_pipeline(source, info), info


def make_dataset(folder):
    folder.mkdir()
    for index, size in enumerate([(384, 256), (256, 384), (300, 300)]):
        image = Image.new("RGB", size, (70 * index, 120, 220))
        image.paste((250, 250, 250), (0, 0, size[0] // 2, size[1] // 3))
        image.save(folder / f"img_{index}.png")
        (folder / f"img_{index}.txt").write_text(f"thing {index}, plain")
    return folder


def cache_for(pipeline_info, folder, output, **options):
    pipeline, info = pipeline_info
    config = parse_config(tiny_config(folder, output, min_bucket_resolution=128, **options))
    return step_data(config, pipeline, info, CPU)


KEYS = [(epoch, entry) for entry in range(3) for epoch in range(6)]  # each image, on several epochs


def files(output):
    return {path.name: path.stat().st_mtime_ns for path in (output / "cache").glob("*.safetensors")}


def test_disk_and_memory_caches_hold_the_same_latents_both_sides(sd, tmp_path):
    folder = make_dataset(tmp_path / "data")
    memory = cache_for(sd, folder, tmp_path / "m", flip_horizontal=True)
    disk = cache_for(sd, folder, tmp_path / "d", flip_horizontal=True, latent_cache="disk")
    assert len(files(tmp_path / "d")) == 3 * 2  # each image, each side
    assert len(memory.layout.buckets) == 3  # a landscape, a portrait and a square bucket
    batches = [memory.collate([key]) for key in KEYS]
    assert {bool(b.flips[0]) for b in batches} == {True, False}
    for key, batch in zip(KEYS, batches, strict=True):  # the same seed: the same choices in both caches
        from_memory = memory.latents.latents(batch, CPU)
        from_disk = disk.latents.latents(disk.collate([key]), CPU)
        assert torch.equal(from_memory, from_disk)
    sides = [memory.latents.latents(b, CPU) for b in batches if b.images[0] == 0]
    assert any(not torch.equal(sides[0], other) for other in sides[1:])  # the two sides differ


def test_disk_cache_is_reused_and_invalidated_by_image_bucket_flip_seed_and_model(sd, tmp_path):
    folder = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    cache_for(sd, folder, out, latent_cache="disk")
    first = files(out)
    assert len(first) == 3
    cache_for(sd, folder, out, latent_cache="disk")
    assert files(out) == first  # nothing re-encoded

    Image.new("RGB", (384, 256), (1, 2, 3)).save(folder / "img_0.png")  # one image changes
    cache_for(sd, folder, out, latent_cache="disk")
    assert len(files(out)) == 4
    cache_for(sd, folder, out, latent_cache="disk", flip_horizontal=True)  # the mirrored sides are new
    assert len(files(out)) == 7
    cache_for(sd, folder, out, latent_cache="disk", bucketing=False)  # square crops: other buckets
    assert len(files(out)) == 9  # the square image keeps its 256x256 bucket
    cache_for(sd, folder, out, latent_cache="disk", seed=8)  # the VAE noise of each latent follows the seed
    assert len(files(out)) == 12

    pipeline, info = sd
    weight = pipeline.vae.encoder.conv_in.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.01)  # another VAE
        cache_for(sd, folder, out, latent_cache="disk")
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert len(files(out)) == 15


def test_text_embeddings_are_cached_for_fixed_captions_and_dropout_uses_the_empty_caption(sd, tmp_path):
    folder = make_dataset(tmp_path / "data")
    data = cache_for(sd, folder, tmp_path / "out", caption_dropout=0.5)
    cached = data.conditioning
    assert isinstance(cached, CachedConditioning) and cached.rows["encoder_hidden_states"].shape[0] == 3
    batches = [data.collate([(epoch, 0)]) for epoch in range(12)]
    assert {bool(b.drops[0]) for b in batches} == {True, False}
    for batch in batches:
        conditioning = cached(batch)
        expected = cached.empty if batch.drops[0] else {"encoder_hidden_states":
                                                        cached.rows["encoder_hidden_states"][:1]}
        assert torch.equal(conditioning["encoder_hidden_states"], expected["encoder_hidden_states"])

    shuffled = cache_for(sd, folder, tmp_path / "out2", shuffle_tags=True)
    assert isinstance(shuffled.conditioning, EncodedConditioning)  # encoded every step instead
    conditioning = shuffled.conditioning(shuffled.collate([(0, 1)]))
    assert conditioning["encoder_hidden_states"].shape == cached.rows["encoder_hidden_states"][:1].shape


@pytest.mark.e2e
def test_training_from_the_disk_cache_equals_training_from_memory(tmp_path):
    folder = make_dataset(tmp_path / "data")
    results = {}
    for mode in ("memory", "disk"):
        config = tiny_config(folder, tmp_path / mode, steps=2, batch_size=1, min_bucket_resolution=128,
                             flip_horizontal=True, validation_steps=100, latent_cache=mode)
        results[mode] = load_file(str(train(parse_config(config), lambda e: None, lambda: False).final_path))
    assert all(torch.equal(results["memory"][key], results["disk"][key]) for key in results["memory"])
    assert len(list((tmp_path / "disk" / "cache").glob("*.safetensors"))) == 6


def test_the_old_cache_latents_field_still_reads():
    assert parse_config(tiny_config("d", "o", cache_latents=False)).latent_cache == "off"
    assert parse_config(tiny_config("d", "o", cache_latents=True)).latent_cache == "memory"
    with pytest.raises(ConfigError) as caught:
        parse_config(tiny_config("d", "o", cache_latents=True, latent_cache="off"))
    assert {field for field, _ in caught.value.problems} == {"cache_latents", "latent_cache"}
