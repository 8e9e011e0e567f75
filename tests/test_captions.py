"""Captions and augmentations: trigger placement, tag shuffle with kept tokens, dropout, repeats, flip, crop.

Every per-step choice comes from (seed, epoch, entry): the same entry gets the same caption and crop whatever
batch it lands in, and a stopped-and-resumed run with every augmentation on ends bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from PIL import Image
from safetensors.torch import load_file

from lora_core import batches, buckets, captions, dataset
from lora_core.config import ConfigError, parse_config
from lora_core.latents import EncodedLatents
from lora_core.plan import run_length
from lora_core.training import train


def test_trigger_placement():
    assert captions.with_trigger(["tok", "style"], " a  b, c ") == "tok, style, a b, c"
    assert captions.with_trigger(["tok"], "a, b", "shuffled") == "tok, a, b"
    assert captions.with_trigger(["tok"], "a, tok, b", "none") == "a, tok, b"  # captions as written
    assert captions.with_trigger(["tok"], "", "none") == "tok"  # no caption: the trigger words


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest():
    caption = "tok, a, b, c, d, e, f"
    results = {captions.shuffle_tags(caption, 2, torch.Generator().manual_seed(seed)) for seed in range(40)}
    assert len(results) > 10
    for result in results:
        tags = captions.split_tags(result)
        assert tags[:2] == ["tok", "a"] and sorted(tags[2:]) == ["b", "c", "d", "e", "f"]
    assert captions.shuffle_tags(caption, 2, torch.Generator().manual_seed(1)) == \
        captions.shuffle_tags(caption, 2, torch.Generator().manual_seed(1))


def test_trigger_words_count_as_kept_tokens_and_stay_first_when_placed_first():
    assert captions.kept_tags(["a", "b"], 0, "first") == 2
    assert captions.kept_tags(["a", "b"], 3, "first") == 3
    assert captions.kept_tags(["a", "b"], 1, "shuffled") == 1


def test_caption_dropout_rate():
    draws = [captions.dropped(0.25, torch.Generator().manual_seed(seed)) for seed in range(2000)]
    assert 0.21 < sum(draws) / len(draws) < 0.29
    assert not any(captions.dropped(0.0, torch.Generator().manual_seed(seed)) for seed in range(50))
    assert all(captions.dropped(1.0, torch.Generator().manual_seed(seed)) for seed in range(50))


def wide_dataset(folder, count: int = 4):
    folder.mkdir()
    for index in range(count):
        image = Image.new("RGB", (384, 256), (60 * index, 100, 200))
        image.paste((255, 255, 255), (0, 0, 200, 256))  # white on the left of any crop: shows flips
        image.save(folder / f"img_{index}.png")
        (folder / f"img_{index}.txt").write_text("red, green, blue, yellow, cyan")
    return folder


class HostBatches:
    """Collate with the latent source of latent_cache 'off' and no model: enough for the per-step choices."""

    def __init__(self, config, report, assigned):
        layout = batches.Layout(config, report, assigned)
        self.collate = batches.Collate(config, layout, EncodedLatents(layout, None, lambda b: (4, b.height // 8,
                                                                                                b.width // 8)))


def host_cache(tmp_path, **options) -> HostBatches:
    folder = wide_dataset(tmp_path / "data")
    config = parse_config(tiny_config(folder, tmp_path / "out", **options))
    report = dataset.scan(folder, config.trigger_words, config.trigger_placement)
    return HostBatches(config, report, dataset.assign_buckets(report, config, 64))


def test_each_entry_draws_the_same_choices_in_any_batch_and_new_ones_each_epoch(tmp_path):
    cache = host_cache(tmp_path, shuffle_tags=True, keep_tokens=2, caption_dropout=0.3, flip_horizontal=True,
                       repeats=3, latent_cache="off", crop="random", bucketing=False)
    alone = [cache.collate([(0, entry)]) for entry in range(12)]
    together = cache.collate([(0, entry) for entry in range(12)])
    assert [b.captions[0] for b in alone] == together.captions
    assert torch.equal(torch.cat([b.flips for b in alone]), together.flips)
    for name in ("pixels", "noise"):  # what the latent source drew (latent_cache 'off')
        assert torch.equal(torch.cat([b.latent_inputs[name] for b in alone]), together.latent_inputs[name])
    next_epoch = cache.collate([(1, entry) for entry in range(12)])
    assert next_epoch.captions != together.captions
    for caption, dropped in zip(together.captions, together.drops.tolist(), strict=True):
        if dropped:
            assert caption == ""
        else:
            assert caption.startswith("shapestyle, red, ")  # keep_tokens 2: the trigger word and "red"
    assert together.images.tolist() == [0, 1, 2, 3] * 3  # repeats: each image three times an epoch
    flips = together.flips.tolist()
    assert 0 < sum(flips) < 12
    for pixels, flip in zip(together.latent_inputs["pixels"], flips, strict=True):  # the white band moves to the right
        assert (pixels[:, :, -1].float().mean() > 250) == flip and (pixels[:, :, 0].float().mean() > 250) != flip
    tops_lefts = {tuple(row[2:4].tolist()) for row in together.time_ids}
    assert len(tops_lefts) > 1  # random crop: 384x256 covers 256x256 with room to move


def test_center_crop_and_no_flip_are_the_same_every_step(tmp_path):
    cache = host_cache(tmp_path, latent_cache="off", bucketing=False)
    first, second = cache.collate([(0, 0), (0, 1)]), cache.collate([(5, 0), (5, 1)])
    assert torch.equal(first.latent_inputs["pixels"], second.latent_inputs["pixels"]) and first.captions is None
    assert first.time_ids[0].tolist() == [256, 384, 0, 64, 256, 256]  # orig h, w; top, left (centre); target


def test_repeats_lengthen_an_epoch():
    document = tiny_config("d", "o", epochs=2, repeats=3, batch_size=2)
    del document["training_params"]["steps"]
    config = parse_config(document)
    assert run_length(config, 9) == (2 * 9, "epochs")  # 6 images x 3 repeats / batch 2, two epochs
    assert run_length(config, buckets.batches_per_epoch([0, 1] * 9, 2)).steps == 2 * 10  # two buckets


def test_random_crop_with_cached_latents_is_refused_naming_both_fields():
    with pytest.raises(ConfigError) as caught:
        parse_config(tiny_config("d", "o", crop="random"))
    assert {field for field, _ in caught.value.problems} == {"crop", "latent_cache"}
    assert "latent_cache to 'off'" in str(caught.value)
    assert parse_config(tiny_config("d", "o", crop="random", latent_cache="off")).crop == "random"


@pytest.mark.e2e
def test_stop_and_resume_with_every_augmentation_is_bit_identical(tmp_path):
    folder = wide_dataset(tmp_path / "data")
    options = dict(steps=3, checkpoint_steps=1, validation_steps=100, shuffle_tags=True, keep_tokens=1,
                   caption_dropout=0.3, flip_horizontal=True, crop="random", latent_cache="off", repeats=2)
    whole = train(parse_config(tiny_config(folder, tmp_path / "whole", **options)), lambda e: None, lambda: False)
    events = []
    config = parse_config(tiny_config(folder, tmp_path / "split", **options))
    first = train(config, events.append, lambda: any(e.type == "progress" and e.step >= 1 for e in events))
    assert first.interrupted and first.step == 1
    second = train(config, lambda e: None, lambda: False, resume=True)
    a, b = load_file(str(whole.final_path)), load_file(str(second.final_path))
    assert all(torch.equal(a[key], b[key]) for key in a)
