"""Several processes through torchrun on the CPU (accelerate's MULTI_CPU, gloo): a real two-process job.

- Two processes with batch b train the same LoRA as one process with batch 2b (tolerance below).
- Only the main process speaks: one JSON stream on stdout, one events.jsonl, one set of files.
- A stop asked of one process stops both after the same step; a fault in one process ends the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import ROOT, SHAPES_DATASET, run_job_here, tiny_config
from safetensors.torch import load_file

from lora_core.configfile import parse_config
from lora_core.eventlog import read_events
from lora_core.events import parse_event

LEARNING_RATE = 1e-3
# Two processes differ from one only in the order of floating-point sums: each process reduces the gradient
# over its own b samples and gloo adds the two halves, where one process reduces over 2b at once. That changes
# the gradient by fp32 rounding (~1e-7 relative), but Adam divides by sqrt(v), so where a gradient is itself
# near rounding level (the self-attention to_k LoRA, whose gradient nearly cancels in the softmax) the step
# can differ by a visible fraction of the learning rate. Measured on this tiny model, 3-4 steps: 2-4e-5, and
# the SAME one-process run with 1 thread instead of 2 (nothing but summation order changed) differs by 3e-5
# too. A real mismatch (another image, noise or timestep in the batch) moves every weight by about lr per
# step (~1e-3 here), so 0.1 * lr per element separates rounding from a wrong sample by 10x both ways.
WEIGHT_TOLERANCE = 0.1 * LEARNING_RATE


def eight_image_dataset(tmp_path: Path) -> Path:
    """8 images, so the global batch of 4 divides an epoch and no process pads its last batch."""
    folder = tmp_path / "dataset"
    shutil.copytree(SHAPES_DATASET, folder)
    images = sorted(p for p in folder.iterdir() if p.suffix != ".txt")
    for index, image in enumerate(images[:8 - len(images)]):
        shutil.copy(image, folder / f"copy_{index}{image.suffix}")
        shutil.copy(image.with_suffix(".txt"), folder / f"copy_{index}.txt")
    return folder


def write_config(tmp_path: Path, name: str, dataset: Path, **overrides) -> Path:
    options = dict(learning_rate=LEARNING_RATE, checkpoint_steps=2, validation_steps=100) | overrides
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny_config(dataset, tmp_path / name, **options)))
    return path


def environment() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(config: Path, *extra: str, script: str = "train_lora.py") -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
               "--config", str(config), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, list, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    events = [parse_event(line) for line in stdout.splitlines()]  # raises on anything that is not an event
    return process.returncode, events, stderr


def types(events) -> list[str]:
    return [event.type for event in events]


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


@pytest.mark.e2e
def test_two_processes_with_batch_b_train_the_lora_of_one_process_with_batch_2b(tmp_path):
    dataset = eight_image_dataset(tmp_path)
    # 4 steps over 8 images with a global batch of 4: two epochs, so the reshuffle is covered too
    two = torchrun(write_config(tmp_path, "two", dataset, steps=4, batch_size=2))
    # the one-process reference trains here (through run_job, as the CLI does) while the two processes run
    one_config = json.loads(write_config(tmp_path, "one", dataset, steps=4, batch_size=4).read_text())
    terminal_one, events_one = run_job_here(parse_config(one_config))
    rc_two, events_two, log_two = finish(two)
    assert rc_two == 0, log_two[-3000:]
    assert terminal_one.type == "complete", terminal_one

    # one voice: the main process's stream only, identical to its events.jsonl, shaped like a one-process run
    assert types(events_two) == types(events_one)
    assert types(events_two).count("started") == 1 and types(events_two).count("complete") == 1
    assert events_two[0].num_processes == 2 and events_one[0].num_processes == 1
    logged = (tmp_path / "two" / "events.jsonl").read_text().splitlines()
    assert [parse_event(line).to_dict() for line in logged] == [event.to_dict() for event in events_two]
    assert files_under(tmp_path / "two") == files_under(tmp_path / "one")

    # the same samples, noise and timesteps: the first loss (mean over all processes) agrees to rounding
    losses_two = [e.loss for e in events_two if e.type == "progress"]
    losses_one = [e.loss for e in events_one if e.type == "progress"]
    assert losses_two[0] == pytest.approx(losses_one[0], rel=1e-5)
    assert losses_two == pytest.approx(losses_one, rel=1e-3)

    lora_two = load_file(str(tmp_path / "two" / "lora_final.safetensors"))
    lora_one = load_file(str(tmp_path / "one" / "lora_final.safetensors"))
    assert lora_two.keys() == lora_one.keys()
    worst = max((lora_two[key] - lora_one[key]).abs().max().item() for key in lora_one)
    assert worst <= WEIGHT_TOLERANCE
    moved = max(lora_one[key].abs().max().item() for key in lora_one if "lora_up" in key)  # lora_up starts at 0
    assert moved > 20 * WEIGHT_TOLERANCE  # training moved the weights far more than the tolerance
    assert all(torch.isfinite(tensor).all() for tensor in lora_two.values())


def read_until(process: subprocess.Popen, wanted: str, timeout: float = 90) -> list:
    """Events from a running process's stdout up to and including the first of type `wanted`."""
    events, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        events.append(parse_event(line))
        if events[-1].type == wanted or time.monotonic() > deadline:
            break
    return events


def worker_with_rank(launcher: subprocess.Popen, rank: int, timeout: float = 30) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no process with rank {rank} under the launcher")


@pytest.mark.e2e
def test_a_stop_asked_of_one_process_stops_both_after_the_same_step(tmp_path):
    config = write_config(tmp_path, "run", eight_image_dataset(tmp_path), steps=500, checkpoint_steps=1000)
    launcher = torchrun(config)
    try:
        before = read_until(launcher, "progress")
        worker_with_rank(launcher, 1).send_signal(signal.SIGTERM)  # rank 0 itself is never signalled
        started = time.monotonic()
        rc, after, log = finish(launcher, timeout=60)
    finally:
        launcher.kill()
    events = before + after
    assert time.monotonic() - started < 30
    assert types(events).count("started") == 1
    terminal = [event for event in events if event.terminal]
    assert [event.type for event in terminal] == ["interrupted"], log[-3000:]
    assert terminal[0].step < 500 and Path(terminal[0].checkpoint_path).is_file()
    assert rc != 0  # torchrun reports the stop as a failed job
    assert read_events(tmp_path / "run" / "events.jsonl")[-1].to_dict() == terminal[0].to_dict()


FAULTY_RANK = """
import os, runpy, sys
sys.path.insert(0, {root!r})
if os.environ.get("RANK") == "1":  # the third forward pass of rank 1 fails
    import torch.nn.functional as F
    real, calls = F.mse_loss, []
    def mse_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault on rank 1")
        return real(*args, **kwargs)
    F.mse_loss = mse_loss
sys.argv[0] = "train_lora.py"
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.e2e
def test_a_fault_in_one_process_ends_every_process_with_one_error(tmp_path):
    config = write_config(tmp_path, "run", eight_image_dataset(tmp_path), steps=500, checkpoint_steps=1000)
    wrapper = tmp_path / "faulty_rank.py"
    wrapper.write_text(FAULTY_RANK.format(root=str(ROOT), script=str(ROOT / "train_lora.py")))
    started = time.monotonic()
    launcher = torchrun(config, script=str(wrapper))
    try:
        rc, events, log = finish(launcher, timeout=90)
    finally:
        launcher.kill()
    assert time.monotonic() - started < 60
    assert rc != 0
    assert types(events).count("started") == 1
    terminal = [event for event in events if event.terminal]
    assert [event.type for event in terminal] == ["error"], log[-3000:]
    assert "injected fault on rank 1" in log  # the failing process's own error reaches the log
    assert "another training process failed" in terminal[0].message
    assert read_events(tmp_path / "run" / "events.jsonl")[-1].to_dict() == terminal[0].to_dict()


def test_each_process_draws_its_slice_of_what_one_process_draws_for_the_whole_batch():
    from lora_core.distributed import SampleNoise

    whole = SampleNoise(seed=3, batch_size=6, num_processes=1, process_index=0, num_timesteps=1000)
    split = [SampleNoise(seed=3, batch_size=2, num_processes=3, process_index=rank) for rank in range(3)]
    for _ in range(2):  # two micro-batches: the streams stay in step
        drawn = whole(torch.zeros(6, 4, 8, 8))  # noise, timesteps, (per-channel offsets)
        parts = [process(torch.zeros(2, 4, 8, 8)) for process in split]
        for index, values in enumerate(drawn):
            assert torch.equal(torch.cat([part[index] for part in parts]), values)
        noise = drawn[0]
    assert not torch.equal(whole(torch.zeros(6, 4, 8, 8))[0], noise)  # each draw is new noise
    saved = whole.state_dict()
    expected = whole(torch.zeros(6, 4, 8, 8))
    resumed = SampleNoise(seed=3, batch_size=6)
    resumed.load_state_dict(saved)  # a resumed run continues the same stream
    got = resumed(torch.zeros(6, 4, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

def test_rank_and_size_come_from_the_launcher_environment(monkeypatch):
    from lora_core import distributed

    for name in distributed.RANK_VARIABLES + distributed.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert (distributed.process_rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.StopVote(1)(True) is True and distributed.StopVote(1)(False) is False
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (distributed.process_rank(), distributed.world_size(), distributed.is_main_process()) == (3, 4, False)
    assert distributed.is_peer_failure(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:5"))
    assert not distributed.is_peer_failure(ValueError("resolution 500 is not a multiple of 64"))
