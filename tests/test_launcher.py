"""The engine in a child process (one device, or several through `accelerate launch`), read as events."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from helpers import tiny_config
from test_distributed import eight_image_dataset

from lora_core.config import parse_config
from lora_core.events import (
    EVENT_TYPES,
    Checkpoint,
    Complete,
    Error,
    Interrupted,
    Progress,
    Sample,
    Started,
    parse_event,
    read_events,
)
from lora_core.launcher import ProcessJob, launch, launch_command
from lora_core.preflight import preflight


@pytest.mark.e2e
def test_one_device_runs_the_cli_and_several_go_through_accelerate_launch():
    assert launch_command("run.json", 1, python="py", script="train_lora.py") == [
        "py", "train_lora.py", "--config", "run.json"]
    command = launch_command("run.json", 4, extra_args=["--resume"], python="py", script="train_lora.py")
    assert command[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4" and "--multi_gpu" in command
    assert command[command.index("--main_process_port") + 1] == "0"  # a free port: two jobs never clash
    assert command[-4:] == ["train_lora.py", "--config", "run.json", "--resume"]


def test_every_event_reads_back_from_its_json_line():
    events = [Started(total_steps=5, num_images=3, device="cuda:0", mixed_precision="bf16", model_family="SDXL",
                      output_path="out", num_processes=4),
              Progress(step=1, total_steps=5, loss=None, percent=20.0, lr=1e-4, it_per_s=0.0, eta_s=-1.0, epoch=0),
              Checkpoint(step=2, path="c"), Sample(step=2, image_path="s.png", prompt="p"),
              Complete(final_path="f", total_time=1.5, step=5), Error(message="m", field="seed"),
              Interrupted(step=3, message="m", checkpoint_path=None)]
    assert {event.type for event in events} == set(EVENT_TYPES)
    assert [parse_event(event.to_json()) for event in events] == events


def test_a_child_that_dies_without_a_result_ends_in_one_error(dataset_dir, tmp_path):
    job = ProcessJob(parse_config(tiny_config(dataset_dir, tmp_path / "out")))
    started = Started(total_steps=5, num_images=3, device="cpu", mixed_precision="no", model_family="SD 1.x",
                      output_path=str(tmp_path / "out"))
    job.command = [sys.executable, "-c", textwrap.dedent(f"""
        import sys
        print({started.to_json()!r}, flush=True)
        print("not an event", flush=True)
        print("CUDA error: an illegal memory access", file=sys.stderr)
        sys.exit(3)
    """)]
    terminal = job.start().wait(30)
    assert [event.type for event in job.snapshot()] == ["started", "error"]
    assert "exited with code 3" in terminal.message and "illegal memory access" in terminal.message
    assert job.returncode == 3 and not job.running
    assert read_events(tmp_path / "out" / "events.jsonl")[-1] == terminal  # events.jsonl still ends the run


@pytest.mark.e2e
def test_two_processes_through_accelerate_launch_stop_together_when_asked(tmp_path):
    config = parse_config(tiny_config(eight_image_dataset(tmp_path), tmp_path / "out", steps=500,
                                      checkpoint_steps=1000, validation_steps=1000))
    assert preflight(config, num_processes=2)["devices"]["global_batch_size"] == 4  # the estimate knows
    job = launch(config, 2, env={"OMP_NUM_THREADS": "1"})
    seen = []
    for event in job.events(timeout=120):
        seen.append(event)
        if event.type == "progress" and event.step == 2:
            job.request_stop()  # SIGTERM to accelerate's launcher, which passes it to both processes
    terminal = job.wait(60)
    assert terminal is not None and terminal.type == "interrupted", job.log_tail()
    assert seen[0].type == "started" and seen[0].num_processes == 2
    assert [e.type for e in seen].count("started") == 1 and seen[-1] == terminal
    assert 2 <= terminal.step < 10 and (tmp_path / "out" / "checkpoints" / f"lora_step_{terminal.step}.safetensors"
                                        ).is_file()
    assert read_events(tmp_path / "out" / "events.jsonl") == seen  # one voice: the file holds what was read
    assert not (tmp_path / "out" / "logs").exists()  # TensorBoard is off by default
    assert json.loads((tmp_path / "out" / "config.json").read_text())["training_params"]["batch_size"] == 2
