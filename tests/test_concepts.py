"""Several concepts in one run, regularisation images (prior preservation) and preservation without images
(lora_core/concepts.py, lora_core/preservation.py): the sampling, the captions, the caches, the plan's checks,
and on builtin:toy-sd that each changes what the model draws in the direction it promises."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from lora_core import batches, concepts, dataset, objective, plan, preservation
from lora_core.config import ConfigError
from lora_core.configfile import parse_config
from lora_core.toy import checker, score, world

DEMO = ROOT / "demo" / "dataset"


def draw_folder(folder: Path, scenes: list[world.Scene], word: str | None, count: int, seed: int,
                captions: bool = True) -> Path:
    """`count` toy pictures of `scenes`, captioned with `word` for their colour (None: the colour's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (scene, image) in enumerate(world.sample_scenes(count, seed, scenes)):
        image.save(folder / f"{index:02d}.png")
        if captions:
            (folder / f"{index:02d}.txt").write_text(scene.caption(word), encoding="utf-8")
    return folder


def toy_config(output: Path, dataset_path: Path = DEMO, **options) -> dict:
    """The demo preset's training settings (120 steps, batch 4, rank 8 on attention and MLP)."""
    params = {"steps": 120, "resolution": 64, "bucketing": False, "trigger_placement": "none", "batch_size": 4,
              "learning_rate": 1e-3, "lora_rank": 8, "lora_alpha": 8, "lora_target": "attention_mlp",
              "checkpoint_steps": 1000, "validation_steps": 1000, "sample_prompts": ["a zwx circle"], "seed": 42}
    params.update(options)
    return {"dataset_path": str(dataset_path), "base_model": "builtin:toy-sd", "output_path": str(output),
            "trigger_words": ["zwx"], "training_params": params}


def cyan_folder(folder: Path) -> Path:
    return draw_folder(folder, [world.Scene(shape, "cyan", background) for shape in world.SHAPES
                                for background in world.COLOURS], "qlc", 18, 5)


def record(concept: int, name: str = "x.png") -> dataset.ImageRecord:
    return dataset.ImageRecord(name, "", 64, 64, True, concept=concept)


def spec(repeats: int, regularization: bool = False, weight: float = 1.0) -> concepts.ConceptSpec:
    return concepts.ConceptSpec("c", "c", ["w"], repeats, False, 0, 0.0, 64, regularization, weight)


# ----------------------------------------------------------------------------------------------------
# sampling and balance


def test_one_concept_keeps_the_old_entry_order(tmp_path):
    config = parse_config(toy_config(tmp_path / "out", repeats=3))
    report = dataset.DatasetReport("d", [record(0, f"{i}.png") for i in range(4)])
    assert concepts.entry_images(report, config) == list(range(4)) * 3


def test_entries_follow_each_concepts_repeats_and_the_regularisation_balance(tmp_path):
    config = parse_config(toy_config(tmp_path / "out"))
    images = [record(0), record(0), record(1), record(2), record(2), record(2), record(2), record(2)]
    report = dataset.DatasetReport("d", images, concepts=[spec(1), spec(3), spec(0, regularization=True)])
    entries = concepts.entry_images(report, config)
    per_concept = [sum(images[e].concept == c for e in entries) for c in range(3)]
    assert per_concept == [2, 3, 5]  # 2 x 1, 1 x 3, and as many class images as training entries
    assert entries[5:] == [3, 4, 5, 6, 7]  # 5 class images for 5 entries: each once
    report.images = images[:6]  # 3 class images for 5 entries: they cycle
    assert concepts.entry_images(report, config)[5:] == [3, 4, 5, 3, 4]
    report.images = images[:2] + images[3:]  # 5 class images for 2 entries: the first two
    assert concepts.entry_images(report, config) == [0, 1, 2, 3]
    report.concepts[2].repeats = 2  # regularization_repeats given: exactly that
    assert concepts.entry_images(report, config)[2:] == [2, 3, 4, 5, 6] * 2


def test_two_concepts_scan_with_their_own_trigger_words_and_the_class_images_keep_theirs(tmp_path):
    cyan = draw_folder(tmp_path / "cyan", [world.Scene("circle", "cyan", "black")], None, 3, 1, captions=False)
    regular = draw_folder(tmp_path / "reg", [world.Scene("circle", "red", "black")], None, 3, 2)
    (regular / "01.txt").unlink()  # a class image without its caption is refused, with the reason
    config = parse_config(toy_config(tmp_path / "out", trigger_placement="first", concepts=[
        {"path": str(cyan), "trigger_words": ["qlc"], "repeats": 2}], regularization_path=str(regular)))
    report, held_out = plan.scan_dataset(config)
    assert held_out is None
    by_concept = [[r.caption for r in report.images if r.concept == c] for c in range(3)]
    assert len(by_concept[0]) == 18 and all(c.startswith("zwx, a zwx ") for c in by_concept[0])
    assert by_concept[1] == ["qlc"] * 3
    assert by_concept[2] == ["a red circle on a black background"] * 2
    assert report.refused == [{"file": "reg/01.png", "reason": concepts.NO_CAPTION_REASON}]
    counts = concepts.counts(report, config)
    assert [(c["num_images"], c["entries_per_epoch"], c["regularization"]) for c in counts] == [
        (18, 18, False), (3, 6, False), (2, 24, True)]
    header = concepts.metadata(report, config)
    assert json.loads(header["ss_dataset_dirs"]) == {"dataset": {"n_repeats": 1, "img_count": 18},
                                                     "cyan": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(header["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 12, "img_count": 2}}
    assert header["ss_prior_loss_weight"] == "1.0" and header["ss_num_reg_images"] == "24"
    assert header["ss_num_train_images"] == "24"  # images times repeats, as sd-scripts counts them


def test_a_bad_concept_is_named_at_its_field(tmp_path):
    config = parse_config(toy_config(tmp_path / "out", concepts=[
        {"path": str(DEMO), "trigger_words": ["a"]}, {"path": str(tmp_path / "missing"), "trigger_words": ["b"]}]))
    report = plan.plan_report(config)
    assert not report["ok"] and report["problems"][0]["field"] == "concepts.1.path"
    assert "missing is not a folder" in report["problems"][0]["message"]
    config = parse_config(toy_config(tmp_path / "out", concepts=[
        {"path": str(DEMO), "trigger_words": ["a"], "resolution": 72}]))
    problems = plan.plan_report(config)["problems"]
    assert problems[0]["field"] == "concepts.0.resolution" and "multiple of 16" in problems[0]["message"]
    with pytest.raises(ConfigError) as caught:
        parse_config(toy_config(tmp_path / "out", preservation_prompt="red", train_text_encoder=True))
    assert {"preservation_prompt", "train_text_encoder"} <= {field for field, _ in caught.value.problems}
    with pytest.raises(ConfigError) as caught:
        parse_config(toy_config(tmp_path / "out", concepts=[{"path": str(DEMO)}, {"pth": "x", "trigger_words": "q"}]))
    assert caught.value.problems[0][0] == "concepts.0.trigger_words"
    assert ("concepts.1.pth", "unknown field; did you mean 'path'?") in caught.value.problems


# ----------------------------------------------------------------------------------------------------
# per-step choices, loss weights and the caches


class NoLatents:
    """The collate's latent source with nothing to load (these tests look at the captions only)."""

    def load(self, choice, generator):
        return {}


def test_each_concept_drops_and_shuffles_its_own_captions(tmp_path):
    other = draw_folder(tmp_path / "o", [world.Scene("circle", "cyan", "black")], "qlc, round, flat, big", 4, 1)
    config = parse_config(toy_config(tmp_path / "out", concepts=[
        {"path": str(other), "trigger_words": ["qlc"], "caption_dropout": 1.0, "shuffle_tags": True,
         "keep_tokens": 1, "repeats": 8}]))
    report, _ = plan.scan_dataset(config)
    layout = batches.Layout(config, report, concepts.assign_buckets(report, config, 16))
    collate = batches.Collate(config, layout, NoLatents())
    assert collate.per_step_captions  # a shuffling concept: captions are made every step
    batch = collate([(0, entry) for entry in range(len(layout.entry_images))])
    of = [report.images[i].concept for i in batch.images.tolist()]
    assert all(drop == (concept == 1) for drop, concept in zip(batch.drops.tolist(), of, strict=True))
    shown = [c for c, concept in zip(batch.captions, of, strict=True) if concept == 0]
    assert shown == [report.images[i].caption for i in batch.images.tolist() if report.images[i].concept == 0]
    collate_kept = batches.Collate(config, layout, NoLatents())
    orders = {collate_kept.caption("qlc, round, flat, big", False, torch.Generator().manual_seed(s),
                                   layout.concepts[1]) for s in range(20)}
    assert len(orders) > 1 and all(order.startswith("qlc, ") for order in orders)


def test_sample_weights_scale_each_samples_loss():
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    weights = torch.tensor([1.0, 0.5, 2.0])
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    loss = objective.diffusion_loss(prediction, target, None, torch.zeros(3), "epsilon", 0, sample_weights=weights)
    assert torch.allclose(loss, (per_sample * weights).mean())
    assert concepts.sample_weights([1.0, 1.0], torch.tensor([0, 1]), "cpu") is None
    assert concepts.sample_weights([1.0, 0.3], torch.tensor([1, 0, 1]), "cpu").tolist() == pytest.approx(
        [0.3, 1.0, 0.3])


def test_the_memory_estimate_counts_the_class_prompts_pass(tmp_path):
    from lora_core import hardware, models

    source = models.resolve("builtin:toy-sd")
    sizes = models.model_sizes(source, models.inspect(source))
    big = {"batch_size": 64, "resolution": 1024}  # activations large enough for the estimate's 3 decimals
    plain, kept = (hardware.estimate_memory(parse_config(toy_config(tmp_path / "out", **big, **options)), sizes,
                                            "no", False) for options in ({}, {"preservation_prompt": "red"}))
    assert kept.activations_gib == pytest.approx(2 * plain.activations_gib, rel=0.01)
    assert kept.frozen_weights_gib == plain.frozen_weights_gib


def test_class_captions_replace_whole_trigger_words_only():
    caption = "zwx, a zwx circle, zwxy, the zwx dog"
    assert preservation.class_caption(caption, ["zwx", "zwx dog"], "red") == "red, a red circle, zwxy, the red"


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """A set-up (untrained) toy run with cached latents and captions: the demo's concept at 64 px, a cyan
    concept at 128 px whose captions are always dropped."""
    from lora_core.setup import setup

    root = tmp_path_factory.mktemp("cached")
    config = parse_config(toy_config(root / "out", latent_cache="memory", concepts=[
        {"path": str(cyan_folder(root / "cyan")), "trigger_words": ["qlc"], "caption_dropout": 1.0,
         "resolution": 128}]))
    return setup(plan.make_plan(config))


def test_cached_latents_follow_each_concepts_resolution(cached_run):
    layout, tables = cached_run.layout, cached_run.latents.tables
    assert [b.name for b in layout.buckets] == ["64x64", "128x128"]
    assert [tuple(t.shape[-2:]) for t in tables] == [(8, 8), (16, 16)]
    assert [len(t) for t in tables] == [18, 18]
    for batch in cached_run.loader:
        sides = {layout.bucket(i).width for i in batch.images.tolist()}
        assert sides == {64 if layout.records[batch.images[0]].concept == 0 else 128}
        assert cached_run.latents.latents(batch, cached_run.device).shape[-1] == max(sides) // 8


def test_cached_captions_are_dropped_for_the_concept_that_drops_them(cached_run):
    seen = set()
    for batch in cached_run.loader:
        text = cached_run.conditioning(batch)["encoder_hidden_states"]
        empty = cached_run.conditioning.empty["encoder_hidden_states"]
        for row, image in zip(text, batch.images.tolist(), strict=True):
            concept = cached_run.layout.records[image].concept
            cached = cached_run.conditioning.rows["encoder_hidden_states"][image]
            assert torch.equal(row, empty[0] if concept == 1 else cached)
            seen.add(concept)
    assert seen == {0, 1}


def test_the_doctor_checks_every_concept_folder(tmp_path, capsys):
    from lora_core import doctor

    cyan = draw_folder(tmp_path / "cyan", [world.Scene("circle", "cyan", "black")], None, 4, 1)  # no "qlc" in them
    config = tmp_path / "config.json"
    config.write_text(json.dumps(toy_config(tmp_path / "out", concepts=[
        {"path": str(cyan), "trigger_words": ["qlc"]}])), encoding="utf-8")
    assert doctor.main([str(DEMO), "--config", str(config), "--json", "--no-cache"]) == 1
    found = json.loads(capsys.readouterr().out)
    assert list(found) == [str(DEMO), str(cyan)]
    alike = [finding for finding in found[str(cyan)] if finding["kind"] == "similar_captions"]
    assert alike and set(alike[0]["files"]) <= {f"0{i}.png" for i in range(4)}  # its four identical captions


# ----------------------------------------------------------------------------------------------------
# on the toy model: what each option promises

LORA_SEEDS = list(range(12))


@functools.cache
def colours(lora: Path, prompt: str) -> list[str | None]:
    """The checker's colour of `prompt` drawn with the LoRA for each of LORA_SEEDS."""
    from diffusers import StableDiffusionPipeline

    from lora_core import builtin

    pipeline = StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("toy-sd"), safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.load_lora_weights(str(lora))
    images = score.draw(pipeline, [prompt] * len(LORA_SEEDS), LORA_SEEDS)
    return [checker.judge(image).colour for image in images]


def rate(found: list[str | None], colour: str) -> float:
    return sum(item == colour for item in found) / len(found)


def test_the_page_edits_concepts_as_json_and_checks_their_folders_against_the_datasets_root(tmp_path):
    from studio import formspec, train_form
    from studio.jobs import Studio
    from studio.uploads import UploadLimits

    spec = next(spec for spec in formspec.field_specs() if spec.name == "concepts")
    assert spec.kind == "json" and "concepts" in formspec.ADVANCED_TABS["Concepts and preservation"]
    studio = Studio(tmp_path / "outputs", devices=0)
    try:
        settings = train_form.PageSettings({}, UploadLimits(), datasets_root=tmp_path / "datasets")
        inside = tmp_path / "datasets" / "demo"
        form = {**train_form.default_form(), "dataset_path": str(inside), "trigger_words": "zwx",
                "concepts": json.dumps([{"path": str(inside / "b"), "trigger_words": ["qlc"], "repeats": 2},
                                        {"path": "/elsewhere/c", "trigger_words": ["rpk"]}]),
                "regularization_path": "/elsewhere/reg"}
        with pytest.raises(ConfigError) as caught:
            train_form.build_config(form, studio, settings)
        fields = [field for field, _ in caught.value.problems]
        assert fields == ["concepts.1.path", "regularization_path"]  # the folder inside the root passes
        assert {train_form.field_of(field) for field in fields} == {"concepts", "regularization_path"}
        with pytest.raises(ConfigError) as caught:
            train_form.build_config({**form, "concepts": '[{"path": "x",'}, studio, settings)
        assert caught.value.problems[0][0] == "concepts" and "not valid JSON" in caught.value.problems[0][1]
        config = train_form.build_config({**form, "concepts": form["concepts"].replace("/elsewhere", str(inside)),
                                          "regularization_path": ""}, studio, settings)
        assert [item.repeats for item in config.concepts] == [2, 1]
        values = train_form.default_form(config)  # and back: the form shows the list as JSON again
        assert [item["trigger_words"] for item in json.loads(values["concepts"])] == [["qlc"], ["rpk"]]
    finally:
        studio.shutdown(timeout=10)


# Magenta circles under "zwx" at a learning rate high enough that the LoRA bleeds into the word "circle":
# without preservation, "a red circle on a white background" stops coming out red. Class images of ordinary
# circles, or preservation_prompt "red", keep it red. Measured over 16 seeds (under load, seed 42): red 3 of 16
# plain, 14 with class images, 16 with preservation; the concept magenta in 14 and 16 of 16.
BLEEDING = dict(steps=200, learning_rate=3e-3, batch_size=2)
KEPT_PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def circle_runs(tmp_path_factory) -> dict[str, Path]:
    """The LoRA of each way to train the magenta circles: plain, with class images, with preservation."""
    from lora_core.training import train

    root = tmp_path_factory.mktemp("circles")
    magenta = draw_folder(root / "magenta", [world.Scene("circle", "magenta", b) for b in world.COLOURS], "zwx",
                          12, 3)
    regular = draw_folder(root / "reg", [world.Scene("circle", colour, background) for colour in world.COLOURS
                                         for background in world.COLOURS if colour != background], None, 30, 4)
    ways = {"plain": {}, "regularization": {"regularization_path": str(regular)},
            "preservation": {"preservation_prompt": "red"}}
    return {name: train(parse_config(toy_config(root / name, magenta, **BLEEDING, **options)), lambda e: None,
                        lambda: False).final_path for name, options in ways.items()}


@pytest.mark.e2e
@pytest.mark.parametrize("way", ["regularization", "preservation"])
def test_keep_what_the_base_knows(circle_runs, way):
    plain, kept = colours(circle_runs["plain"], KEPT_PROMPT), colours(circle_runs[way], KEPT_PROMPT)
    learned = colours(circle_runs[way], "a zwx circle on a black background")
    assert rate(kept, "red") >= rate(plain, "red") + 0.4, (way, plain, kept)
    assert rate(learned, "magenta") >= 0.5, (way, learned)  # and the concept is still learned


@pytest.fixture(scope="module")
def two_concepts(tmp_path_factory):
    """The demo's magenta under "zwx" and cyan under "qlc", trained together: (final LoRA, events)."""
    from lora_core.eventlog import EventLog
    from lora_core.training import train

    root = tmp_path_factory.mktemp("two")
    events: list = []
    config = parse_config(toy_config(root / "out", steps=160, concepts=[
        {"path": str(cyan_folder(root / "cyan")), "trigger_words": ["qlc"]}]))
    log = EventLog(root / "out" / "events.jsonl", events.append)  # as the CLI writes them, for the report
    result = train(config, log, lambda: False)
    log.close()
    return result.final_path, events


@pytest.mark.e2e
def test_two_new_colours_each_under_its_own_trigger_and_no_bleed(two_concepts):
    lora, events = two_concepts
    zwx, qlc = colours(lora, "a zwx circle on a black background"), colours(lora, "a qlc circle on a black background")
    assert rate(zwx, "magenta") >= 0.75 and rate(qlc, "cyan") >= 0.75, (zwx, qlc)
    assert rate(zwx, "cyan") == 0 and rate(qlc, "magenta") == 0, (zwx, qlc)
    counted = next(e for e in events if e.type == "dataset").concepts
    assert [(c["name"], c["num_images"], c["entries_per_epoch"]) for c in counted] == [("dataset", 18, 18),
                                                                                       ("cyan", 18, 18)]
    table = next(e for e in events if e.type == "concept_bleed").rows
    assert {(row["concept"], row["from_concept"]) for row in table} == {("dataset", "cyan"), ("cyan", "dataset")}
    # measured -0.08 and -1.7: neither trigger draws the other's images better than a made-up word
    assert all(row["loss_own"] < row["loss_bare"] and row["bleed"] < 0.3 for row in table), table
    assert events[-1].type == "complete"


@pytest.mark.e2e
def test_the_report_shows_each_concept_and_the_bleed(two_concepts):
    from lora_core import report

    lora, _ = two_concepts
    page = report.write_report(lora.parent).read_text(encoding="utf-8")
    assert "<h2>Concepts</h2>" in page and "<h3>Bleed</h3>" in page and "qlc (cyan)" in page
