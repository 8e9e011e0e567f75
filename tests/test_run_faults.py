"""Whole runs meeting faults: the dataset is reported, a sample that cannot be saved is a warning, and a
full disk mid-run ends with one error naming the file and the last good checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, tiny_config
from test_disk_full import SmallDisk

from lora_core import plan, samples, training
from lora_core.configfile import parse_config
from lora_core.eventlog import read_events
from lora_core.files import DiskFullError

pytestmark = pytest.mark.e2e
SHORT = dict(steps=4, checkpoint_steps=2, validation_steps=2, sample_inference_steps=1)


def test_the_cli_reports_its_dataset_with_every_refused_file(dataset_dir, tmp_path):
    (dataset_dir / "broken.png").write_bytes(b"not a png")
    os.mkfifo(dataset_dir / "pipe.jpg")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(dataset_dir, tmp_path / "out", steps=1, validation_steps=100)))
    result = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(config)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["type"] for e in events[:2]] == ["started", "dataset"]
    report = events[1]
    assert report["num_images"] == 6 and report["num_refused"] == 2 and report["num_captioned"] == 5
    assert {item["file"] for item in report["refused"]} == {"broken.png", "pipe.jpg"}
    warning = next(line for line in result.stderr.splitlines() if "refused" in line)
    assert "broken.png" in warning and "pipe.jpg" in warning
    assert [e.type for e in read_events(tmp_path / "out" / "events.jsonl")][:2] == ["started", "dataset"]


def test_a_sample_that_cannot_be_saved_is_a_warning_and_the_run_completes(dataset_dir, tmp_path, monkeypatch):
    real = samples.atomic_write

    def no_room_for_pngs(path, write, needed=None):
        if str(path).endswith(".png"):
            raise DiskFullError(path, 50_000)
        return real(path, write, needed)

    monkeypatch.setattr(samples, "atomic_write", no_room_for_pngs)
    events = []
    training.train(parse_config(tiny_config(dataset_dir, tmp_path / "out", **SHORT)), events.append, lambda: False)
    warnings = [e for e in events if e.type == "warning"]
    assert [w.step for w in warnings] == [2, 4] and "step_2.png" in warnings[0].message
    assert events[-1].type == "complete" and (tmp_path / "out" / "lora_final.safetensors").is_file()


def test_a_full_disk_mid_run_ends_with_one_error_naming_the_file_and_the_last_good_checkpoint(
        dataset_dir, tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path / "small", monkeypatch)
    from lora_core.job import run_job

    events = []

    def emit(event):  # the disk fills up right after the first checkpoint
        events.append(event)
        if event.type == "checkpoint" and event.step == 2:
            disk.fill()

    monkeypatch.setattr(plan, "check_output_folder", lambda _path, keep=True: None)  # it would refuse 2 MiB
    output = disk.folder / "out"
    try:
        terminal = run_job(parse_config(tiny_config(dataset_dir, output, steps=6, checkpoint_steps=2,
                                                    validation_steps=100)), emit, lambda: False)
        assert terminal.type == "error" and terminal.field == "output_path", terminal
        assert "lora_step_4.safetensors" in terminal.message and str(output / "checkpoints") in terminal.message
        assert "last good checkpoint is step 2" in terminal.message
        assert [e.type for e in events].count("error") == 1 and events[-1] is terminal
        text = (output / "events.jsonl").read_bytes()
        assert text.endswith(b"\n") and all(json.loads(line) for line in text.splitlines())
    finally:
        disk.release()
