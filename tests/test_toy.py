"""builtin:toy-sd, the built-in model that has learned something: its world and checker, its shipped weights,
that it draws its vocabulary, and that a LoRA this trainer makes teaches it the demo's concept (a colour it has
never seen), loaded from the exported file with diffusers' `load_lora_weights`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from helpers import ROOT
from PIL import Image

from lora_core import builtin
from lora_core.configfile import parse_config
from lora_core.errors import UserError
from lora_core.toy import checker, pretrain, score, shipped, world
from lora_core.training import train

DEMO_PRESET = ROOT / "presets" / "demo-toy-cpu.json"


def toy_pipeline() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("toy-sd"), safety_checker=None,
                                                   requires_safety_checker=False)


def test_the_checker_reads_every_scene_of_the_world_and_the_concept_right():
    pictures = world.sample_scenes(200, 3, world.vocabulary() + world.concept_scenes())
    wrong = [(scene, checker.judge(image)) for scene, image in pictures if not checker.judge(image).matches(scene)]
    assert wrong == []


def test_the_checker_sees_no_shape_in_noise_or_a_blank_picture():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    blank = Image.new("RGB", (64, 64), world.rgb("blue"))
    assert checker.judge(blank) == checker.Verdict(None, None, "blue")
    assert checker.judge(noise).shape is None


def test_the_world_never_shows_the_held_out_colour_and_the_demo_dataset_is_only_it():
    assert all(scene.colour not in world.HELD_OUT and scene.background not in world.HELD_OUT
               for scene in world.vocabulary())
    captions = [path.read_text(encoding="utf-8").strip() for path in sorted((ROOT / "demo" / "dataset").glob("*.txt"))]
    assert len(captions) >= 8 and all(f"a {world.TRIGGER} " in caption for caption in captions)
    for picture in sorted((ROOT / "demo" / "dataset").glob("*.png")):
        assert checker.judge(Image.open(picture)).colour == "magenta", picture


def test_the_demo_dataset_is_what_the_toy_command_draws(tmp_path):
    from lora_core.toy.__main__ import write_demo_dataset

    drawn = write_demo_dataset(tmp_path / "demo")
    shipped_files = sorted(p.name for p in (ROOT / "demo" / "dataset").iterdir())
    assert sorted(p.name for p in drawn.iterdir()) == shipped_files
    for name in shipped_files:
        assert (drawn / name).read_bytes() == (ROOT / "demo" / "dataset" / name).read_bytes(), name


def test_the_shipped_weights_match_their_sums_and_a_changed_file_is_refused(tmp_path):
    assert shipped.verified_folder() == shipped.WEIGHTS
    total = sum(p.stat().st_size for p in shipped.WEIGHTS.rglob("*") if p.is_file())
    assert total < 20 * 1024**2
    copy = tmp_path / "weights"
    shutil.copytree(shipped.WEIGHTS, copy)
    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    unet.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its SHA-256") as caught:
        shipped.verified_folder(copy)
    assert caught.value.field == "base_model" and "python -m lora_core.toy pretrain" in str(caught.value)
    unet.unlink()
    with pytest.raises(UserError, match="is missing"):
        shipped.verified_folder(copy)


def test_resolution_takes_the_toy_models_own_size_and_names_its_steps(tmp_path):
    from lora_core import models, plan

    toy = models.inspect(models.resolve("builtin:toy-sd"))
    assert toy.pixel_multiple == 16
    config = parse_config(demo_config(tmp_path / "out"))
    assert config.resolution == 64
    plan.check_resolution(config, toy)  # the toy's own size is accepted
    with pytest.raises(plan.ResolutionError, match=r"use 64 or 80 \(this SD 1.x model takes multiples of 16 "
                                                   r"from 64\)"):
        plan.check_resolution(parse_config(demo_config(tmp_path / "out", resolution=72)), toy)
    # a model whose step is above 64 sets the lower bound itself
    coarse = models.ModelInfo("sd1", "epsilon", 8, 16)
    with pytest.raises(plan.ResolutionError, match="below 128, the smallest size this SD 1.x model takes"):
        plan.check_resolution(config, coarse)
    with pytest.raises(UserError, match="resolution"):
        parse_config(demo_config(tmp_path / "out", resolution=32))


@pytest.mark.e2e  # a server, a trained run or a whole model written: not the quick subset
def test_export_builtin_writes_a_diffusers_folder_other_tools_open(tmp_path):
    command = [sys.executable, "-m", "lora_core", "export-builtin", "toy-sd", str(tmp_path / "toy")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "toy" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert not (tmp_path / "toy" / shipped.SUMS).exists()
    from lora_core.__main__ import export_builtin  # what the command runs: its refusals, without a process each

    with pytest.raises(SystemExit, match="already exists"):
        export_builtin("toy-sd", str(tmp_path / "toy"))
    with pytest.raises(SystemExit, match="unknown built-in model 'nope'"):
        export_builtin("nope", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_one_short_pretraining_runs_and_writes_a_pipeline(tmp_path):
    lines: list[str] = []
    pretrain.pretrain(tmp_path / "model", seed=1, vae_steps=1, unet_steps=1, log=lines.append, per_scene=1)
    assert any(line.startswith("vae step 1/1") for line in lines)
    assert any(line.startswith("unet step 1/1") for line in lines)
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    assert pipeline.vae.config.scaling_factor != 1.0  # set from the encoded latents' spread


@pytest.mark.e2e
def test_the_toy_model_draws_its_vocabulary():
    rate = score.vocabulary_score(toy_pipeline())
    assert rate >= 0.8, f"{rate:.0%} of {score.VOCABULARY_PROMPTS} vocabulary prompts drawn right"


def demo_config(output, **overrides) -> dict:
    data = json.loads(DEMO_PRESET.read_text(encoding="utf-8"))
    data["dataset_path"] = str(ROOT / "demo" / "dataset")
    data["output_path"] = str(output)
    data["training_params"].update(overrides)
    return data


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo preset as it ships, trained once for the module: (result, events)."""
    events: list = []
    config = parse_config(demo_config(tmp_path_factory.mktemp("demo") / "out"))
    result = train(config, events.append, lambda: False)
    return result, events


@pytest.mark.e2e
def test_the_base_model_never_draws_the_demo_concept():
    rate = score.concept_rate(toy_pipeline())
    assert rate <= 0.1, f"the base model drew '{score.CONCEPT_PROMPT}' magenta in {rate:.0%} of seeds"


@pytest.mark.e2e
def test_the_demo_lora_loaded_by_diffusers_draws_the_concept(demo_run):
    result, events = demo_run
    assert events[-1].type == "complete"
    pipeline = toy_pipeline()
    pipeline.load_lora_weights(str(result.final_path))  # the exported file, as a diffusers user loads it
    rate = score.concept_rate(pipeline)
    assert rate >= 0.8, f"with the demo LoRA, '{score.CONCEPT_PROMPT}' came out magenta in {rate:.0%} of seeds"
    # a colour for a word, not one picture: another shape on another background comes out magenta too, if
    # less reliably after a minute (40 % when measured), where the base model never draws it
    other_prompt = f"a {world.TRIGGER} triangle on a blue background"
    other, base = score.concept_rate(pipeline, other_prompt), score.concept_rate(toy_pipeline(), other_prompt)
    assert base <= 0.1 and other >= 0.25, f"'{other_prompt}' magenta in {other:.0%} of seeds, base {base:.0%}"


@pytest.mark.e2e
def test_the_demo_samples_end_in_the_concept(demo_run):
    _, events = demo_run
    samples = [e for e in events if e.type == "sample" and e.prompt == score.CONCEPT_PROMPT]
    assert len(samples) >= 3
    assert checker.judge(Image.open(samples[-1].image_path)).colour == "magenta"


@pytest.mark.e2e
def test_the_held_out_loss_of_the_demo_concept_falls_during_the_demo(demo_run):
    """The preset holds out 3 of the 18 magenta pictures. Measured with seeds 42, 7 and 123: 0.0906 before the
    first step (the same for every seed: fixed noise and timesteps), 0.031-0.034 at step 120, a ratio of
    0.35-0.37; a LoRA that learned nothing of the concept stays near 1. 0.6 leaves room for other machines'
    float rounding and keeps a real regression (no learning, or validation on trained images) caught."""
    _, events = demo_run
    values = [(e.step, e.loss) for e in events if e.type == "validation"]
    assert values[0][0] == 0 and values[-1][0] == 120 and len(values) == 13
    assert values[-1][1] < 0.6 * values[0][1], values
    dataset = next(e for e in events if e.type == "dataset")
    assert dataset.num_validation_images == 3 and dataset.num_images == 15


@pytest.fixture(scope="module")
def text_encoder_run(tmp_path_factory):
    """The demo preset with a LoRA on the text encoder too, trained once for the module."""
    config = parse_config(demo_config(tmp_path_factory.mktemp("te") / "out", **TEXT_ENCODER))
    return train(config, lambda event: None, lambda: False)


TEXT_ENCODER = dict(train_text_encoder=True, text_encoder_lr=2e-3)


@pytest.mark.e2e
def test_a_text_encoder_lora_loaded_by_diffusers_draws_the_concept(text_encoder_run):
    from safetensors import safe_open

    with safe_open(str(text_encoder_run.final_path), "pt") as handle:
        keys = list(handle.keys())
    assert any(key.startswith("lora_te_") for key in keys)
    pipeline = toy_pipeline()
    pipeline.load_lora_weights(str(text_encoder_run.final_path))
    rate = score.concept_rate(pipeline)
    assert rate >= 0.8, f"with the text-encoder LoRA, the concept came out magenta in {rate:.0%} of seeds"
