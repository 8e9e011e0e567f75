"""`python -m lora_core inspect | resize | merge | bake`: each checked against applying the files themselves."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from test_lora_files import BASE, perturb
from test_text_encoder_lora import load, unet_inputs

from lora_core import families
from lora_core.configfile import parse_config
from lora_core.lora import add_lora, add_text_encoder_lora, lora_file_contents, save_lora, training_metadata
from lora_core.lorafile import apply_lora, read, weight_deltas
from lora_core.loratools import main, summary


def write_lora(path, seed: int, rank: int = 4, alpha: float = 6, target: str = "locon", network: str = "lora"):
    config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "lora_rank": rank, "lora_alpha": alpha,
                           "lora_target": target, "network_type": network, "train_text_encoder": True})
    pipeline = load("sd1")
    add_lora(pipeline.unet, config)
    add_text_encoder_lora(pipeline.text_encoder, config)
    perturb([pipeline.unet, pipeline.text_encoder], seed)
    state, header = lora_file_contents(pipeline.unet, config, [pipeline.text_encoder])
    from datetime import UTC, datetime

    header |= training_metadata(config, families.get("sd1"), "epsilon", steps=5, epochs=1, num_images=6, precision="no",
                                started_at=datetime.now(UTC), tag_frequency={"t": 1})
    return save_lora(path, state, header)


def unet_out(pipeline) -> torch.Tensor:
    with torch.no_grad():
        return pipeline.unet(**unet_inputs("sd1")).sample


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    return folder, write_lora(folder / "a.safetensors", 1), write_lora(folder / "b.safetensors", 2, rank=2, alpha=1,
                                                                       target="attention")


def test_inspect_prints_a_table_and_json(files, capsys):
    _, a, _ = files
    assert main(["inspect", str(a)]) == 0
    table = capsys.readouterr().out
    assert "lora" in table and "rank(s)" in table and "6" in table and "builtin:tiny-sd" in table
    assert main(["inspect", str(a), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "lora" and info["ranks"] == [4] and info["alphas"] == [6.0]
    assert info["parts"] == ["te", "unet"] and "conv1" in info["targets"] and "to_q" in info["targets"]
    assert info["trigger_words"] == "t" and info["settings"]["steps"] == "5"


def test_resize_to_full_rank_reproduces_the_file_and_lower_ranks_report_what_they_keep(files, capsys):
    folder, a, _ = files
    full = folder / "full.safetensors"
    assert main(["resize", str(a), "--rank", "4", "-o", str(full)]) == 0
    assert read(full).metadata["ss_output_name"] == "full"  # its own alias, not its input's
    original, resized = weight_deltas(a), weight_deltas(full)
    assert original.keys() == resized.keys()
    for name in original:
        torch.testing.assert_close(resized[name], original[name], rtol=0, atol=1e-5)
    capsys.readouterr()
    small = folder / "small.safetensors"
    assert main(["resize", str(a), "--energy", "0.6", "-o", str(small)]) == 0
    report = capsys.readouterr().out
    kept = [float(line.split("kept ")[1].split(" %")[0]) for line in report.splitlines() if " kept " in line]
    assert len(kept) == len(original) and all(60 <= share <= 100 for share in kept)
    ranks = {layer.rank for layer in read(small).layers.values()}
    assert max(ranks) <= 4 and min(ranks) < 4
    with safe_open(str(small), "pt") as handle:
        assert handle.metadata()["ss_network_dim"] in {"Dynamic", *map(str, ranks)}


def test_merge_equals_applying_both(files):
    folder, a, b = files
    merged = folder / "merged.safetensors"
    assert main(["merge", str(a), str(b), "--weights", "0.7", "-0.4", "-o", str(merged)]) == 0
    both = load("sd1")
    apply_lora(both, a, 0.7)
    apply_lora(both, b, -0.4)
    one = load("sd1")
    apply_lora(one, merged, 1.0)
    torch.testing.assert_close(unet_out(one), unet_out(both), rtol=0, atol=1e-5)
    assert (unet_out(one) - unet_out(load("sd1"))).abs().max() > 1e-3
    assert {layer.rank for name, layer in read(merged).layers.items() if name.endswith("attn1_to_q")} == {6}
    with safe_open(str(merged), "pt") as handle:  # plain LoRA: diffusers reads it too
        meta = handle.metadata()
    sha = hashlib.sha256(a.read_bytes()).hexdigest()
    assert meta["modelspec.merged_from"].startswith(f"my_style (a.safetensors, sha256 {sha}) x 0.7, my_style (")
    # its own alias: A1111 calls a LoRA by ss_output_name, and the inputs share "my_style"
    assert meta["ss_output_name"] == meta["modelspec.title"] == "merged"
    assert meta["ss_output_name"] not in {read(path).metadata["ss_output_name"] for path in (a, b)}
    diffusers_loaded = load("sd1")
    diffusers_loaded.load_lora_weights(str(merged))
    torch.testing.assert_close(unet_out(diffusers_loaded), unet_out(both), rtol=0, atol=1e-5)


def test_lycoris_files_resize_with_the_base_model(tmp_path):
    lokr = write_lora(tmp_path / "lokr.safetensors", 3, network="lokr")
    info = summary(read(lokr))
    assert info["type"] == "lokr" and info["ranks"] == [4] and info["whole_factor_layers"] > 0
    assert main(["resize", str(lokr), "--rank", "64", "-o", str(tmp_path / "x.safetensors")]) == 2  # needs --base
    out = tmp_path / "lora.safetensors"
    assert main(["resize", str(lokr), "--rank", "1000", "--base", "builtin:tiny-sd", "-o", str(out)]) == 0
    wanted, got = load("sd1"), load("sd1")
    apply_lora(wanted, lokr, 1.0)
    apply_lora(got, out, 1.0)
    torch.testing.assert_close(unet_out(got), unet_out(wanted), rtol=0, atol=1e-5)


def test_bake_writes_a_diffusers_folder_whose_unet_equals_the_base_with_the_lora(files, tmp_path, capsys):
    _, a, _ = files
    out = tmp_path / "baked"
    command = ["bake", str(a), "--base", "builtin:tiny-sd", "--scale", "0.5", "-o", str(out)]
    assert main(command) == 0
    baked = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    loaded = load("sd1")
    loaded.load_lora_weights(str(a))
    loaded.set_adapters(["default_0"], [0.5])
    torch.testing.assert_close(unet_out(baked), unet_out(loaded), rtol=0, atol=1e-5)
    assert (unet_out(baked) - unet_out(load("sd1"))).abs().max() > 1e-3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"
    mask = os.umask(0o022)
    os.umask(mask)
    unreadable = [p.name for p in out.rglob("*") if p.is_file() and p.stat().st_mode & 0o777 != 0o666 & ~mask]
    assert unreadable == [], "a baked folder's files get open()'s permissions (safetensors writes 0600)"
    capsys.readouterr()
    assert main(command) == 2 and "already exists" in capsys.readouterr().err


def test_tools_refuse_pickles_and_bad_arguments(files, tmp_path, capsys):
    _, a, b = files
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"x")
    assert main(["inspect", str(pickle)]) == 2 and "pickle" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--weights", "1", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "one per file" in capsys.readouterr().err
    assert main(["resize", str(a), "--energy", "1.5", "-o", str(tmp_path / "r.safetensors")]) == 2
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.e2e
def test_python_m_lora_core_dispatches_to_the_tools(files):
    import subprocess
    import sys

    from helpers import ROOT

    done = subprocess.run([sys.executable, "-m", "lora_core", "inspect", str(files[1]), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"] == len(read(files[1]).layers)
