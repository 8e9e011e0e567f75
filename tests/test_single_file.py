"""Single-file `.safetensors` checkpoints (the A1111/civitai layout): the family is read from the weights, and an
SD 1.x file trains through `train_lora.py` exactly as the same model in diffusers' folder layout does.

Nothing can be downloaded here, so the test writes `builtin:tiny-sd` out in the original (LDM) key layout and
gives diffusers, offline, a hub cache whose `stable-diffusion-v1-5/stable-diffusion-v1-5` configs are tiny-sd's
(diffusers reads the configs of a single file's family from that repository, once, then from the cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tiny_config
from safetensors.torch import load_file, save_file

from lora_core import builtin, models
from lora_core.models import ModelError

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # where diffusers reads an SD 1.x file's configs


def ldm_unet(unet: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers UNet names -> the original `model.diffusion_model.` names (SD 1.x layout)."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, tensor in unet.items():
        parts = key.split(".")
        if parts[0] in fixed:
            new = [fixed[parts[0]], *parts[1:]]
        elif ".".join(parts[:2]) in fixed:
            new = [fixed[".".join(parts[:2])], *parts[2:]]
        elif parts[0] == "mid_block":  # mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0/1/2
            index = {"resnets": int(parts[2]) * 2, "attentions": 1}[parts[1]]
            new = [f"middle_block.{index}", *(parts[3:])]
        else:
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                row = 1 + block * (layers + 1) + (layers if kind == "downsamplers" else index)
                slot = {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[kind]
                rest = rest[1:] if kind == "downsamplers" else rest  # drop the `conv` level: `op` is the conv
            else:
                row = block * (layers + 1) + (layers if kind == "upsamplers" else index)
                has_attention = any(k.startswith(f"up_blocks.{block}.attentions.") for k in unet)
                slot = {"resnets": "0", "attentions": "1", "upsamplers": "2" if has_attention else "1"}[kind]
            new = [f"{'input' if parts[0] == 'down_blocks' else 'output'}_blocks.{row}.{slot}", *rest]
        if ".resnets." in key and new[-2] in resnet:
            new[-2] = resnet[new[-2]]
        out["model.diffusion_model." + ".".join(new)] = tensor
    return out


def ldm_vae(vae: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers VAE names -> `first_stage_model.` names (the mid-block attention as 1x1 convolutions)."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, tensor in vae.items():
        new = key.replace(".conv_shortcut.", ".nin_shortcut.")
        for side, blocks, level in (("encoder", "down_blocks", "down"), ("decoder", "up_blocks", "up")):
            for index in range(levels):
                ldm_index = index if side == "encoder" else levels - 1 - index
                new = new.replace(f"{side}.{blocks}.{index}.resnets.", f"{side}.{level}.{ldm_index}.block.")
                new = new.replace(f"{side}.{blocks}.{index}.downsamplers.0.", f"{side}.down.{ldm_index}.downsample.")
                new = new.replace(f"{side}.{blocks}.{index}.upsamplers.0.", f"{side}.up.{ldm_index}.upsample.")
            new = new.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            new = new.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            for diffusers_name, ldm_name in attention.items():
                prefix = f"{side}.mid_block.attentions.0.{diffusers_name}."
                if new.startswith(prefix):
                    new = f"{side}.mid.attn_1.{ldm_name}." + new[len(prefix):]
                    if tensor.dim() == 2:
                        tensor = tensor[:, :, None, None]
        new = new.replace(".conv_norm_out.", ".norm_out.")
        out["first_stage_model." + new] = tensor
    return out


def write_sd1_single_file(path: Path) -> Path:
    folder = Path(builtin.builtin_folder("tiny-sd"))
    unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    state = ldm_unet(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
                     unet_config["layers_per_block"])
    state |= ldm_vae(load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")),
                     len(vae_config["block_out_channels"]))
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    state |= {"cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): tensor
              for key, tensor in text.items()}
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def hub_cache_with_tiny_configs(cache: Path) -> Path:
    """An offline hub cache holding tiny-sd's configs and tokenizer (no weights) as SD 1.5's repository."""
    snapshot = cache / f"models--{SD15_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(builtin.builtin_folder("tiny-sd"), snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    return cache


@pytest.mark.parametrize(("marker", "family"), [
    ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", "sd1"),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "sd2"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl"),
])
def test_the_family_is_read_from_the_weights(tmp_path, marker, family):
    path = tmp_path / "model.safetensors"
    save_file({marker: torch.zeros(2, 2), "model.diffusion_model.out.2.weight": torch.zeros(2)}, str(path))
    info = models.inspect(models.resolve(str(path)))
    assert info.family == family


def test_a_lora_or_a_damaged_file_is_refused_with_the_reason(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelError, match="is it a LoRA"):
        models.inspect(models.resolve(str(lora)))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        models.inspect(models.resolve(str(broken)))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02")
    with pytest.raises(ModelError, match=".safetensors"):
        models.resolve(str(pickle))


def train_cli(dataset: Path, output: Path, base_model: str, env: dict, **options) -> list[dict]:
    config = tiny_config(dataset, output, validation_steps=100, **options)
    config["base_model"] = base_model
    config_file = output.with_suffix(".json")
    config_file.write_text(json.dumps(config), encoding="utf-8")
    run = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(config_file)], env=env,
                         capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 0 and events[-1]["type"] == "complete", run.stderr[-2000:]
    return events


@pytest.mark.e2e
def test_an_sd1_single_file_trains_exactly_as_its_diffusers_folder(dataset_dir, tmp_path):
    single = write_sd1_single_file(tmp_path / "tiny-sd.safetensors")
    assert models.inspect(models.resolve(str(single))).family == "sd1"
    hub = hub_cache_with_tiny_configs(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    from_file = train_cli(dataset_dir, tmp_path / "single", str(single), env, steps=2)
    from_folder = train_cli(dataset_dir, tmp_path / "folder", str(builtin.builtin_folder("tiny-sd")), env, steps=2)
    single_lora, folder_lora = (load_file(events[-1]["final_path"]) for events in (from_file, from_folder))
    assert single_lora.keys() == folder_lora.keys()
    different = [key for key in single_lora if not torch.equal(single_lora[key], folder_lora[key])]
    assert not different, f"{len(different)} of {len(single_lora)} tensors differ, e.g. {different[0]}"

    # the prediction type is not in the weights: it comes with the family's scheduler config
    scheduler_file = next(hub.glob("models--*/snapshots/*/scheduler/scheduler_config.json"))
    scheduler = json.loads(scheduler_file.read_text(encoding="utf-8"))
    scheduler_file.write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}), encoding="utf-8")
    events = train_cli(dataset_dir, tmp_path / "v", str(single), env, steps=1)
    assert events[0]["type"] == "started" and events[0]["model_family"].endswith("(v-prediction)")


def test_pipeline_components_gives_an_sd1_file_its_configs_without_the_hub(tmp_path, monkeypatch):
    """With pipeline_components a folder, diffusers reads the file's configs and tokenizer from it (no hub cache
    at all here), and the weights from the file: the same UNet, VAE and text encoder as the folder's."""
    from lora_core import components
    from lora_core.config import TrainConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    single = write_sd1_single_file(tmp_path / "tiny-sd.safetensors")
    folder = builtin.builtin_folder("tiny-sd")
    config = TrainConfig(dataset_path=str(tmp_path), output_path=str(tmp_path / "out"), trigger_words=["x"],
                         base_model=str(single), pipeline_components=str(folder))
    source, info = components.resolve_base_model(config)
    pipeline = models.load_pipeline(source, info, config)
    reference = models.load_pipeline(models.resolve(str(folder)), info)
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipeline, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
