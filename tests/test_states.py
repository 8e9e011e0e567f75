"""Training states under hostile timing: a COMPLETE marker means complete, resume passes over damaged states,
and a fresh run never mixes with another run's states."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from lora_core import checkpoint
from lora_core.checkpoint import ResumeError
from lora_core.configfile import parse_config
from lora_core.files import DiskFullError
from lora_core.training import train

BASE = {"dataset_path": "data", "base_model": "builtin:tiny-sd", "output_path": "out", "trigger_words": ["t"]}


def _state(output: Path, step: int, config=None, keep: int = 10) -> Path:
    config = config or parse_config(BASE)
    param = torch.nn.Parameter(torch.full((4, 4), float(step)))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = checkpoint.TrainerState(step, 0, step, 0, {}, config.model_dump(mode="json"))
    return checkpoint.save_state(output, step, state, {"w": param}, optimizer, keep)


def _killed_when_deleting_a_state(monkeypatch):
    """shutil.rmtree as a SIGKILL would leave it: one file of a state folder gone, then the process dead."""
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False):
        path = Path(path)
        if checkpoint.STATE_DIR.match(path.name):
            (path / "lora.safetensors").unlink(missing_ok=True)
            raise SystemExit("killed while deleting a state in place")
        real_rmtree(path, ignore_errors=True)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)


def test_replacing_a_state_of_the_same_step_never_leaves_a_marker_without_files(tmp_path, monkeypatch):
    _state(tmp_path, 2)
    _state(tmp_path, 4)
    _killed_when_deleting_a_state(monkeypatch)
    _state(tmp_path, 4)  # the same step again (a resumed run reaching it)
    _state(tmp_path, 6, keep=2)  # pruning the oldest
    folders = checkpoint.state_folders(tmp_path)
    assert [step for step, _ in folders] == [4, 6]
    assert all(checkpoint.damage(folder) is None for _, folder in folders)


def test_resume_passes_over_a_damaged_state_and_says_so(tmp_path, caplog):
    _state(tmp_path, 2)
    newest = _state(tmp_path, 4)
    (newest / "optimizer.safetensors").write_bytes((newest / "optimizer.safetensors").read_bytes()[:50])
    skipped = []
    assert checkpoint.latest_state(tmp_path, skipped).name == "state_step_2"
    assert len(skipped) == 1 and "state_step_4" in skipped[0] and "damaged" in skipped[0]
    assert "state_step_4" in caplog.text
    (tmp_path / "checkpoints" / "state_step_2" / "lora.safetensors").unlink()
    with pytest.raises(ResumeError, match="every training state .* is damaged"):
        checkpoint.latest_state(tmp_path)


def test_resume_refuses_a_state_made_with_other_training_settings(tmp_path):
    made = parse_config(BASE)
    folder = _state(tmp_path, 2, made)
    param = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    for change in ({"learning_rate": 1e-3}, {"trigger_words": ["other"]}, {"lr_scheduler": "cosine"}):
        with pytest.raises(ResumeError, match=next(iter(change))):
            checkpoint.load_state(folder, parse_config({**BASE, **change}), {"w": param}, optimizer)
    longer = parse_config({**BASE, "steps": 5000, "validation_steps": 7})  # the run's length may change
    assert checkpoint.load_state(folder, longer, {"w": param}, optimizer).step == 2


def test_a_full_disk_while_saving_a_state_removes_the_partial_one_and_names_the_last_good(tmp_path, monkeypatch):
    _state(tmp_path, 2)

    def full(tensors, filename, metadata=None):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                           'space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(DiskFullError) as caught:
        _state(tmp_path, 4)
    message = str(caught.value)
    assert "lora.safetensors" in message and "state_step_4" in message and "step 2" in message
    assert "--resume" in message and caught.value.field == "output_path"
    assert not list((tmp_path / "checkpoints").glob(".state_step_4*"))


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    _state(tmp_path, 2)
    (tmp_path / "checkpoints" / ".state_step_4.partial-99").mkdir()
    (tmp_path / "checkpoints" / ".state_step_2.old-99").mkdir()
    (tmp_path / ".lora_final.safetensors.k2j3.tmp").write_bytes(b"half")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".step_3.png.a8f.tmp").write_bytes(b"half")
    removed = checkpoint.clean_leftovers(tmp_path)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []
    assert [step for step, _ in checkpoint.state_folders(tmp_path)] == [2]


def test_the_sweep_of_leftovers_spares_nothing_the_page_server_keeps_its_job_files_apart(tmp_path):
    """Everything in a run folder is the run's: the server's job.json lives in OUTPUTS/.studio/jobs/<id>
    (studio/jobfiles.py), so a forked job sweeping its folder at once can never take the server's write."""
    (tmp_path / ".lora_final.safetensors.k2j3.tmp").write_bytes(b"half")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".step_2.png.q9.tmp").write_bytes(b"half")
    removed = checkpoint.clean_leftovers(tmp_path)
    assert sorted(path.name for path in removed) == [".lora_final.safetensors.k2j3.tmp", ".step_2.png.q9.tmp"]


def test_a_fresh_run_into_a_folder_with_training_states_is_refused_before_any_model_loads(dataset_dir, tmp_path):
    output = tmp_path / "out"
    _state(output, 900)
    (output / ".config.json.x1.tmp").write_bytes(b"half")
    config = parse_config(tiny_config(dataset_dir, output))
    with pytest.raises(ResumeError) as caught:
        train(config, lambda event: None, lambda: False)
    assert caught.value.field == "output_path" and "step 900" in str(caught.value) and "--resume" in str(caught.value)
    assert not (output / ".config.json.x1.tmp").exists()  # cleaned up by this run all the same
    assert json.loads((output / "checkpoints" / "state_step_900" / "trainer_state.json").read_text())["step"] == 900
