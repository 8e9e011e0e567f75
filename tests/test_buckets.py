"""Aspect-ratio bucketing: the bucket set, each image's bucket, batches that never mix shapes, the report."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from helpers import Tap, tiny_config, train_tapped
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_core import buckets, dataset
from lora_core.buckets import Bucket, BucketBatchSampler
from lora_core.config import parse_config


def test_buckets_have_about_the_area_sides_on_the_multiple_and_within_limits():
    found = buckets.make_buckets(512, 64, 256, 1024)
    assert Bucket(512, 512) in found and Bucket(1024, 256) in found and Bucket(256, 1024) in found
    for bucket in found:
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert min(bucket.width, bucket.height) >= 256 and max(bucket.width, bucket.height) <= 1024
        assert bucket.width * bucket.height <= 512 * 512
        assert Bucket(bucket.height, bucket.width) in found  # portrait for every landscape


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    found = buckets.make_buckets(512, 64, 256, 1024)
    assert buckets.closest_bucket(1000, 1000, found) == Bucket(512, 512)
    wide = buckets.closest_bucket(2000, 1000, found)
    assert wide.width > wide.height and abs(math.log(wide.width / wide.height / 2)) < 0.15
    assert buckets.closest_bucket(1000, 2000, found) == Bucket(wide.height, wide.width)
    assert buckets.closest_bucket(5000, 100, found) == Bucket(1024, 256)  # the widest there is


def test_no_upscale_gives_a_small_image_its_own_smaller_bucket():
    assigned = buckets.assign([(300, 200), (2000, 1000)], 512, 64, 256, 1024, no_upscale=True)
    assert assigned[0] == Bucket(256, 192)  # rounded down: cropped, never enlarged
    assert assigned[1] == buckets.assign([(2000, 1000)], 512, 64, 256, 1024)[0]  # large ones: the usual bucket


def test_cover_then_crop_size_covers_the_bucket():
    assert buckets.cover_and_crop(1000, 500, Bucket(512, 512)) == (1024, 512)
    width, height = buckets.cover_and_crop(333, 1000, Bucket(320, 768))
    assert width >= 320 and height >= 768 and min(width - 320, height - 768) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 4), st.integers(0, 5))
def test_an_epoch_is_every_entry_once_in_same_bucket_batches_from_seed_and_epoch(of_entry, batch, epoch):
    sampler = BucketBatchSampler(of_entry, batch, seed=3)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert sorted(entry for b in batches for _, entry in b) == list(range(len(of_entry)))
    assert all(len({of_entry[entry] for _, entry in b}) == 1 and 0 < len(b) <= batch for b in batches)
    assert all(e == epoch for b in batches for e, _ in b)
    again = BucketBatchSampler(of_entry, batch, seed=3)
    again.set_epoch(epoch)
    assert list(again) == batches  # a pure function of (seed, epoch): resume sees the same order
    assert len(sampler) == len(batches) == buckets.batches_per_epoch(of_entry, batch)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=30), st.integers(1, 3), st.integers(2, 3))
def test_processes_sharded_by_accelerate_see_the_global_batches_of_one_process(of_entry, batch, processes):
    one = list(BucketBatchSampler(of_entry, batch * processes, seed=5))
    shards = [list(BatchSamplerShard(BucketBatchSampler(of_entry, batch, seed=5, num_processes=processes),
                                     num_processes=processes, process_index=rank)) for rank in range(processes)]
    assert all(len(shard) == len(one) for shard in shards)
    for step, global_batch in enumerate(one):
        parts = [shard[step] for shard in shards]
        assert all(len({of_entry[entry] for _, entry in part}) == 1 for part in parts)
        assert {of_entry[entry] for part in parts for _, entry in part} == {of_entry[global_batch[0][1]]}
        if len(global_batch) == batch * processes:  # full batches split exactly; short ones may repeat one
            assert [key for part in parts for key in part] == global_batch


def test_one_bucket_keeps_the_plain_permutation_order():
    batches = list(BucketBatchSampler([0] * 6, 2, seed=7))
    order = torch.randperm(6, generator=torch.Generator().manual_seed(7 * 100_003)).tolist()
    assert [entry for b in batches for _, entry in b] == order


def mixed_dataset(folder, sizes) -> None:
    folder.mkdir()
    for index, (width, height) in enumerate(sizes):
        Image.new("RGB", (width, height), (40 * index % 255, 90, 160)).save(folder / f"img_{index}.png")
        (folder / f"img_{index}.txt").write_text(f"shape {index}, blue, plain")


SIZES = [(512, 256), (480, 250), (256, 512), (300, 300), (600, 590), (256, 520)]


def test_the_bucket_table_is_in_the_dataset_report(tmp_path):
    mixed_dataset(tmp_path / "data", SIZES)
    report = dataset.scan(tmp_path / "data", ["tok"])
    config = parse_config(tiny_config(tmp_path / "data", tmp_path / "out", min_bucket_resolution=128))
    assigned = dataset.assign_buckets(report, config, 64)
    assert report.to_dict()["buckets"] == {"192x320": 2, "256x256": 2, "320x192": 2} == buckets.table(assigned)
    square = parse_config(tiny_config(tmp_path / "data", tmp_path / "out", bucketing=False))
    dataset.assign_buckets(report, square, 64)
    assert report.to_dict()["buckets"] == {"256x256": 6}


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_training_batches_never_mix_shapes(tmp_path, model):
    mixed_dataset(tmp_path / "data", SIZES)
    seen = []

    def tap_run(run):
        def on_latents(args, latents):
            seen.append((tuple(latents.shape), run.layout.buckets[args[0].bucket]))

        def on_conditioning(args, conditioning):
            if "added_cond_kwargs" in conditioning:  # SDXL: the target size is the bucket's
                bucket = run.layout.buckets[args[0].bucket]
                time_ids = conditioning["added_cond_kwargs"]["time_ids"]
                assert time_ids[:, 4:].tolist() == [[bucket.height, bucket.width]] * len(time_ids)

        run.latents = Tap(run.latents, on_latents, "latents")
        run.conditioning = Tap(run.conditioning, on_conditioning)

    config = tiny_config(tmp_path / "data", tmp_path / "out", steps=3, batch_size=2, min_bucket_resolution=128,
                         validation_steps=100, checkpoint_steps=100) | {"base_model": model}
    events = []
    result = train_tapped(parse_config(config), tap_run, events.append)
    assert result.step == 3 and events[-1].type == "complete"
    assert {bucket for _, bucket in seen} == {Bucket(176, 352), Bucket(256, 256), Bucket(352, 176)}  # multiple 16
    for shape, bucket in seen:  # one shape per batch, the bucket's, in latent pixels
        assert shape[0] == 2 and shape[2:] == (bucket.height // 8, bucket.width // 8)
