"""The run plan: what training and --validate-only both decide before any weights load, and the model
families it reads models through."""

from __future__ import annotations

import pytest
import torch
from helpers import SHAPES_DATASET, tiny_config

from lora_core import families, plan
from lora_core.configfile import parse_config
from lora_core.errors import UserError


def test_the_plan_holds_what_training_starts_from(tmp_path):
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", steps=None, epochs=2, batch_size=4))
    made = plan.make_plan(config, num_processes=1)
    assert len(made.dataset.images) == 6 and len(made.assigned) == 6
    assert made.batches_per_epoch == 2 and made.length == (4, "epochs")  # 6 images, batch 4: 2 batches an epoch
    assert made.family is families.get("sd1") and made.info.description == "SD 1.x"
    assert made.device == torch.device("cpu") and made.precision == "no"
    assert made.gradient_checkpointing is False  # auto: never on the CPU
    assert made.memory_estimate().total_gib > 0


def test_the_report_and_the_plan_agree(tmp_path):
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out"))
    report = plan.plan_report(config, num_processes=1)
    made = plan.make_plan(config, num_processes=1)
    assert report["ok"] and report["total_steps"] == made.total_steps == 6
    assert report["model"]["family"] == made.info.description
    assert report["dataset"]["buckets"] == made.dataset.buckets
    assert report["memory_estimate"] == made.memory_estimate().to_dict()


def test_a_resolution_the_model_cannot_take_is_a_user_error_under_resolution(tmp_path):
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", resolution=264))  # tiny-sd needs 16
    with pytest.raises(plan.ResolutionError) as caught:
        plan.make_plan(config)
    assert isinstance(caught.value, UserError) and caught.value.field == "resolution"
    assert "use 256 or 272" in str(caught.value)
    report = plan.plan_report(config, num_processes=1)
    assert not report["ok"] and [p["field"] for p in report["problems"]] == ["resolution"]


def test_every_problem_is_reported_under_its_field_not_only_the_first(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    config = parse_config(tiny_config(tmp_path / "missing", blocked / "out") | {"base_model": "builtin:nope"})
    report = plan.plan_report(config, num_processes=1)
    assert {p["field"] for p in report["problems"]} == {"dataset_path", "base_model", "output_path"}
    with pytest.raises(UserError) as caught:  # training stops at the first, before anything loads
        plan.make_plan(config)
    assert caught.value.field == "output_path"
    # both walk plan.CHECKS: the report's first problem is the one training stops at, in the same words
    assert report["problems"][0] == {"field": caught.value.field, "message": str(caught.value)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_user_error_under_device(tmp_path):
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", device="cuda"))
    with pytest.raises(plan.DeviceError) as caught:
        plan.make_plan(config)
    assert caught.value.field == "device" and "no CUDA GPU" in str(caught.value)


def test_the_run_length_says_what_decided_it():
    base = tiny_config("d", "o")
    config = parse_config(base)
    assert plan.run_length(config, 100) == (6, "steps")
    assert plan.run_length(config.model_copy(update={"steps": None, "epochs": 3}), 5) == (15, "epochs")
    assert plan.run_length(config.model_copy(update={"steps": None}), 5) == (1000, "default")
    accumulating = config.model_copy(update={"steps": None, "epochs": 2, "gradient_accumulation_steps": 2})
    assert plan.run_length(accumulating, 5) == (6, "epochs")  # ceil(5 / 2) optimizer steps an epoch


def test_families_are_detected_most_specific_first():
    unet = {"unet": ["diffusers", "UNet2DConditionModel"]}
    assert families.detect_folder({**unet, "_class_name": "StableDiffusionXLPipeline"}, {}).name == "sdxl"
    assert families.detect_folder(unet, {"addition_embed_type": "text_time", "cross_attention_dim": 1024}
                                  ).name == "sdxl"
    assert families.detect_folder(unet, {"cross_attention_dim": 1024}).name == "sd2"
    assert families.detect_folder(unet, {"cross_attention_dim": 768}).name == "sd1"  # the UNet fallback
    assert families.detect_folder({"_class_name": "FluxPipeline"}, {}).name == "flux"
    assert families.detect_folder({"_class_name": "StableDiffusion3Pipeline"}, {}).name == "sd3"
    assert families.detect_folder({"_class_name": "QwenImagePipeline", "transformer": []}, {}) is None
    assert families.detect_single_file(["cond_stage_model.model.x", "model.diffusion_model.y"]).name == "sd2"
    assert families.detect_single_file(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]).name == "flux"
    assert families.detect_single_file(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]
                                       ).name == "sd3"
    assert families.detect_single_file(["lora_unet_x.lora_down.weight"]) is None
    with pytest.raises(KeyError, match="registered: flux, sd3, sdxl, sd2, sd1"):
        families.get("qwen-image")
