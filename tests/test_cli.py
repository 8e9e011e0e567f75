"""train_lora.py as other programs use it: a subprocess whose stdout is JSON lines, and its files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from helpers import ROOT, SHAPES_DATASET, tiny_config
from PIL import Image
from safetensors import safe_open

# every test here trains or serves end to end; the module shares a trained run, so one xdist worker runs it
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("test_cli")]

EVENT_FIELDS = {
    "started": {"total_steps", "num_images", "device"},
    "dataset": {"num_images", "num_captioned", "refused", "num_refused", "ignored", "warnings"},
    "warning": {"message", "step", "field"},
    "progress": {"step", "total_steps", "loss", "percent", "lr", "it_per_s", "eta_s"},
    "checkpoint": {"step", "path"},
    "sample": {"step", "image_path", "prompt"},
    "complete": {"final_path", "total_time", "step"},
    "error": {"message", "step", "field"},
    "interrupted": {"step", "message", "checkpoint_path"},
    "validation_report": {"ok", "problems", "warnings"},
}


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


ENGINE = [sys.executable, "-m", "lora_core", "train"]  # the engine's own entry point; train_lora.py is its shim


def run_cli(*args: str, timeout: float = 240, command: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(command or [sys.executable, str(ROOT / "train_lora.py")]), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=os.environ.copy())


def validation_report(stdout: str) -> dict:
    """--validate-only's one stdout line: a typed event like every other line."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    (report,) = parse_events(lines[0])
    assert report["type"] == "validation_report"
    return report


def parse_events(stdout: str) -> list[dict]:
    events = [json.loads(line) for line in stdout.splitlines()]  # every stdout line must be JSON
    for event in events:
        assert EVENT_FIELDS[event["type"]] <= set(event), event
        datetime.fromisoformat(event["timestamp"])
    return events


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-run")
    config = write_config(folder, tiny_config(SHAPES_DATASET, folder / "out", sample_prompts=["shapestyle, a circle"]))
    result = run_cli("--config", str(config))
    return result, folder / "out"


def test_cli_run_emits_every_event_and_exits_zero(finished_run):
    result, _ = finished_run
    assert result.returncode == 0, result.stderr[-2000:]
    events = parse_events(result.stdout)
    types = [event["type"] for event in events]
    assert types[0] == "started" and types[-1] == "complete"
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [3]  # 6 is the final file, not a checkpoint
    assert [e["step"] for e in events if e["type"] == "sample"] == [3, 6]
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["percent"] == 100.0 and all(e["loss"] > 0 for e in progress)
    assert events[-1]["step"] == 6


def test_cli_run_writes_every_file(finished_run):
    _, out = finished_run
    assert (out / "checkpoints" / "lora_step_3.safetensors").is_file()
    assert Image.open(out / "samples" / "step_3.png").size == (256, 256)
    assert (out / "samples" / "step_6.png").is_file()
    resolved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert resolved["training_params"]["steps"] == 6 and resolved["base_model"] == "builtin:tiny-sd"
    logged = [json.loads(line) for line in (out / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["type"] for e in logged] == [e["type"] for e in parse_events(finished_run[0].stdout)]
    assert not list(out.rglob("*.tmp")), "no temporary files are left behind"


def test_final_lora_has_kohya_keys_metadata_and_changes_the_pipeline(finished_run):
    import torch
    from diffusers import StableDiffusionPipeline

    from lora_core import builtin

    _, out = finished_run
    final = out / "lora_final.safetensors"
    with safe_open(str(final), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_steps"] == "6" and metadata["modelspec.trigger_phrase"] == "shapestyle"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(metadata["ss_tag_frequency"])["dataset"]["shapestyle"] == 6
    unet_file = builtin.builtin_folder("tiny-sd") / "unet" / "diffusion_pytorch_model.safetensors"
    # a folder is no single file A1111 could have hashed: the UNet weights' SHA-256 under the studio's own key
    assert metadata["lora_studio.base_unet_sha256"] == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    assert "ss_sd_model_hash" not in metadata and len(metadata["sshs_legacy_hash"]) == 8

    pipeline = StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("tiny-sd"), safety_checker=None)
    inputs = (torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([400]),
              torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        before = pipeline.unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        pipeline.load_lora_weights(str(final))
        after = pipeline.unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert (after - before).abs().max() > 1e-4


def test_config_error_is_one_error_event_naming_the_field(tmp_path):
    config = tiny_config(SHAPES_DATASET, tmp_path / "out", batch_size=500)
    result = run_cli("--config", str(write_config(tmp_path, config)))
    assert result.returncode == 1
    events = parse_events(result.stdout)
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["field"] == "batch_size" and "[1, 64]" in events[0]["message"]
    assert not (tmp_path / "out").exists(), "a bad config writes nothing"


def test_dataset_error_is_an_error_event(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--config", str(write_config(tmp_path, tiny_config(empty, tmp_path / "out"))))
    assert result.returncode == 1
    events = parse_events(result.stdout)
    assert events[-1]["type"] == "error" and events[-1]["field"] == "dataset_path"
    assert "no usable image" in events[-1]["message"]


def test_validate_only_good_config_reports_device_and_memory_and_trains_nothing(tmp_path):
    """Through the engine's own command (train_lora.py, its shim, runs the other tests here)."""
    result = run_cli("--config", str(write_config(tmp_path, tiny_config(SHAPES_DATASET, tmp_path / "out"))),
                     "--validate-only", command=ENGINE)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = validation_report(result.stdout)
    assert report["ok"] and report["device"]["kind"] == "cpu"
    assert report["dataset"]["num_images"] == 6 and report["total_steps"] == 6
    assert report["model"]["family"] == "SD 1.x"
    assert report["memory_estimate"]["total_gib"] > 0 and "activations" in report["memory_estimate"]["covers"]
    assert not (tmp_path / "out" / "lora_final.safetensors").exists()


@pytest.mark.parametrize(("change", "field"), [
    ({"base_model": "builtin:no-such-model"}, "base_model"),
    ({"base_model": "/nowhere/model.ckpt"}, "base_model"),
    ({"dataset_path": "/nowhere"}, "dataset_path"),
])
def test_validate_only_names_the_field_of_what_is_not_there(tmp_path, change, field):
    """What --validate-only prints, in this process: the command around it (its one line, exit code 1) is
    proven by the tests around this one."""
    from lora_core.cli import validate

    config = {**tiny_config(SHAPES_DATASET, tmp_path / "out"), **change}
    report = validate(str(write_config(tmp_path, config)))
    assert not report.ok and field in [problem["field"] for problem in report.problems]


def test_validate_only_with_a_config_error(tmp_path):
    config = tiny_config(SHAPES_DATASET, tmp_path / "out", lora_rank=0)
    result = run_cli("--config", str(write_config(tmp_path, config)), "--validate-only")
    assert result.returncode == 1
    assert validation_report(result.stdout)["problems"][0]["field"] == "lora_rank"


def test_sigterm_mid_run_saves_a_checkpoint_and_exits_143(tmp_path):
    """The engine's entry point trains on its main thread; SIGTERM sets the flag the loop reads after a step."""
    config = tiny_config(SHAPES_DATASET, tmp_path / "out", steps=400, checkpoint_steps=1000, validation_steps=1000)
    process = subprocess.Popen([*ENGINE, "--config", str(write_config(tmp_path, config))], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    lines = []
    deadline = time.monotonic() + 180
    for line in process.stdout:
        lines.append(line)
        if json.loads(line).get("step") == 3:
            process.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline
    lines.extend(process.stdout)
    assert process.wait(timeout=120) == 143
    events = parse_events("".join(lines))
    last = events[-1]
    assert last["type"] == "interrupted" and 3 <= last["step"] < 400
    assert Path(last["checkpoint_path"]).is_file()
    assert last["checkpoint_path"].endswith(f"lora_step_{last['step']}.safetensors")
    assert not (tmp_path / "out" / "lora_final.safetensors").exists()


def test_help_shows_examples_and_train_lora_is_a_shim_over_the_engine():
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0 and "examples:" in result.stdout and "--validate-only" in result.stdout
    engine = run_cli("--help", timeout=60, command=ENGINE)
    assert engine.returncode == 0
    examples = engine.stdout.split("examples:")[1]  # the same options and examples, under each command's name
    assert examples.replace("python -m lora_core train", "python train_lora.py") == result.stdout.split("examples:")[1]
    engine_sources = "".join(path.read_text() for path in (ROOT / "lora_core").glob("*.py"))
    assert "train_lora" not in engine_sources  # the engine never names a face


def test_an_unreachable_hub_model_is_a_clear_error_not_a_hang(tmp_path):
    config = {**tiny_config(SHAPES_DATASET, tmp_path / "out"), "base_model": "stabilityai/stable-diffusion-2-1"}
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "empty-hf-home")  # nothing cached: the hub must be asked
    result = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config",
                             str(write_config(tmp_path, config)), "--validate-only"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 1
    problems = {p["field"]: p["message"] for p in validation_report(result.stdout)["problems"]}
    assert "cannot reach the Hugging Face hub" in problems["base_model"]
