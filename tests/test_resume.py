"""Nothing lost: stop or crash at any moment, resume from the last complete state, get the same LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_job_here, tiny_config
from safetensors.torch import load_file

from lora_core import checkpoint
from lora_core.configfile import parse_config
from lora_core.training import train

# every test here trains or serves end to end; the module shares a trained run, so one xdist worker runs it
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("test_resume")]

STEPS = 8
OPTIONS = dict(steps=STEPS, checkpoint_steps=2, validation_steps=1000, lora_dropout=0.1, lr_scheduler="cosine",
               lr_warmup_steps=2)


def run(config: dict, resume: bool = False, stop_at: int | None = None):
    events = []

    def should_stop() -> bool:
        return stop_at is not None and any(e.type == "progress" and e.step >= stop_at for e in events)

    result = train(parse_config(config), events.append, should_stop, resume=resume)
    return result, events


def lora_of(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    dataset = ROOT / "tests" / "data" / "shapes"
    result, _ = run(tiny_config(dataset, folder / "out", **OPTIONS))
    return lora_of(result.final_path)


def test_stop_then_resume_is_bit_identical_to_an_uninterrupted_run(dataset_dir, tmp_path, uninterrupted):
    config = tiny_config(dataset_dir, tmp_path / "out", **OPTIONS)
    first, events = run(config, stop_at=3)  # 6 images, batch 2: stops mid-epoch, after step 3
    assert first.interrupted and events[-1].type == "interrupted" and events[-1].step == 3
    assert (tmp_path / "out" / "checkpoints" / "state_step_3" / checkpoint.MARKER).is_file()
    second, events = run(config, resume=True)
    assert events[0].type == "started" and events[0].resumed_from_step == 3
    assert [e.step for e in events if e.type == "progress"] == [4, 5, 6, 7, 8]
    assert_identical(lora_of(second.final_path), uninterrupted)


def test_old_states_are_pruned_after_the_new_one_is_complete(dataset_dir, tmp_path):
    run(tiny_config(dataset_dir, tmp_path / "out", **{**OPTIONS, "keep_checkpoints": 2}))
    states = [path.name for _, path in checkpoint.state_folders(tmp_path / "out")]
    assert states == ["state_step_6", "state_step_8"]
    loras = sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("lora_step_*.safetensors"))
    assert loras == ["lora_step_2.safetensors", "lora_step_4.safetensors", "lora_step_6.safetensors"]


def _cli(config_path, *extra, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(config_path), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


def resume_here(config_path) -> tuple:
    """`train_lora.py --config F --resume`, through the same `run_job`, in this process: (final event, events)."""
    return run_job_here(parse_config(json.loads(config_path.read_text(encoding="utf-8"))), resume=True)


def test_sigkill_inside_a_state_save_resumes_from_the_last_complete_one(dataset_dir, tmp_path, uninterrupted):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config(dataset_dir, tmp_path / "out", **OPTIONS)), encoding="utf-8")
    killed = _cli(config_path, env={checkpoint.KILL_HOOK: "6"})
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "out" / "checkpoints"
    assert [p.name for _, p in checkpoint.state_folders(tmp_path / "out")][-1] == "state_step_4"
    assert list(checkpoints.glob(".state_step_6.partial-*")), "the kill really landed inside the save"
    assert not (checkpoints / "state_step_6").exists()

    terminal, events = resume_here(config_path)  # what `--resume` runs: the kill was the process's own
    assert events[0].resumed_from_step == 4 and terminal.type == "complete"
    assert not list(checkpoints.glob(".state_step_*.partial-*")), "leftovers of the killed save are cleaned"
    assert_identical(lora_of(tmp_path / "out" / "lora_final.safetensors"), uninterrupted)


def test_sigkill_at_a_random_moment_then_resume(dataset_dir, tmp_path, uninterrupted):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config(dataset_dir, tmp_path / "out", **OPTIONS)), encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(config_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    for line in process.stdout:
        if json.loads(line).get("step") == 5:  # between checkpoints: step 4 is saved, 5 is not
            process.kill()
            break
    process.wait(timeout=60)
    terminal, events = resume_here(config_path)
    assert terminal.type == "complete" and events[0].resumed_from_step == 4
    assert_identical(lora_of(tmp_path / "out" / "lora_final.safetensors"), uninterrupted)


def test_resume_with_a_changed_rank_is_refused(dataset_dir, tmp_path):
    run(tiny_config(dataset_dir, tmp_path / "out", steps=2, checkpoint_steps=1, validation_steps=100))
    changed = parse_config(tiny_config(dataset_dir, tmp_path / "out", steps=4, lora_rank=8, validation_steps=100))
    terminal, _ = run_job_here(changed, resume=True)
    assert terminal.type == "error" and terminal.field == "resume"
    assert "lora_rank was 4, now 8" in terminal.message


def test_resume_with_more_steps_continues_a_finished_run(dataset_dir, tmp_path):
    run(tiny_config(dataset_dir, tmp_path / "out", steps=2, validation_steps=100))
    result, events = run(tiny_config(dataset_dir, tmp_path / "out", steps=4, validation_steps=100), resume=True)
    assert events[0].resumed_from_step == 2 and result.step == 4


def test_resume_with_nothing_saved_is_a_clear_error(dataset_dir, tmp_path):
    terminal, _ = run_job_here(parse_config(tiny_config(dataset_dir, tmp_path / "out")), resume=True)
    assert terminal.type == "error" and "nothing to resume" in terminal.message


def test_non_finite_loss_is_skipped_then_stops_with_an_error_and_saves_nothing(dataset_dir, tmp_path, monkeypatch):
    import lora_core.objective as objective

    real_mse = objective.F.mse_loss
    calls = {"n": 0}

    def mse_that_breaks(prediction, target, **kwargs):
        calls["n"] += 1
        loss = real_mse(prediction, target, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss  # two good steps, then NaN for ever

    monkeypatch.setattr(objective.F, "mse_loss", mse_that_breaks)
    config = parse_config(tiny_config(dataset_dir, tmp_path / "out", steps=50, checkpoint_steps=1000,
                                      validation_steps=1000, max_nonfinite_steps=3))
    terminal, events = run_job_here(config)
    assert terminal.type == "error" and "NaN/inf for 3 steps in a row after step 2" in terminal.message
    assert "fp16" in terminal.message and "learning_rate" in terminal.message
    assert [e.step for e in events if e.type == "progress"] == [1, 2]
    assert not (tmp_path / "out" / "lora_final.safetensors").exists()


def test_unwritable_output_is_refused_before_training(dataset_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    terminal, _ = run_job_here(parse_config(tiny_config(dataset_dir, blocker / "out")))
    assert terminal.type == "error" and terminal.field == "output_path" and "cannot write" in terminal.message
