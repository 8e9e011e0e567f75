"""The job registry's queue and devices, with stand-in job processes (no training: seconds, not minutes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import SHAPES_DATASET, tiny_config, wait_until

from lora_core.configfile import parse_config
from studio import launcher
from studio.jobfiles import jobs_folder
from studio.jobs import BusyError, Studio
from studio.queue import queue_path
from studio.runs import list_runs

ENGINE_STANDIN = "import time; time.sleep(60)"  # a job that runs until it is stopped


@pytest.fixture
def studios(monkeypatch):
    """Make Studios whose jobs are stand-in processes; every one is shut down (its jobs stopped) after."""
    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [sys.executable, "-c", ENGINE_STANDIN])
    made: list[Studio] = []

    def make(outputs: Path, **options) -> Studio:
        made.append(Studio(outputs, **options))
        return made[-1]

    yield make
    for studio in made:
        studio.shutdown(timeout=10)


# A job that starts training, then on SIGTERM stops as the engine does: an `interrupted` event, exit 0.
STOPPABLE_STANDIN = """
import json, signal, sys, time
from pathlib import Path
from lora_core.events import Interrupted, Progress, Started
from lora_core.eventlog import EventLog
run = json.loads(Path(sys.argv[1]).read_text())["output_path"]  # its --config, in the job's own folder
log = EventLog(Path(run) / "events.jsonl")
def stop(*_):
    log(Interrupted(step=1, message="stopped by the user", checkpoint_path=None))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
log(Started(total_steps=9, num_images=1, device="cpu", mixed_precision="no", model_family="sd15",
            output_path=run))
log(Progress(step=1, total_steps=9, loss=0.5, percent=11.0, lr=1e-4, it_per_s=1.0, eta_s=8.0, epoch=0))
time.sleep(60)
"""


def config(outputs: Path, name: str):
    return parse_config(tiny_config(SHAPES_DATASET, outputs / name))


def devices_of(studio: Studio, job_id: str) -> list[int]:
    return json.loads((jobs_folder(studio.outputs_root) / job_id / "job.json").read_text())["devices"]


def test_one_job_per_gpu_and_the_next_starts_on_the_gpu_that_frees(studios, tmp_path):
    studio = studios(tmp_path, devices=2)
    answers = [studio.submit(config(tmp_path, f"run{i}")) for i in range(3)]
    assert [(a.state, a.position) for a in answers] == [("running", 0), ("running", 0), ("queued", 1)]
    assert devices_of(studio, answers[0].job_id) == [0] and devices_of(studio, answers[1].job_id) == [1]
    assert studio.free_devices() is None and studio.view(answers[2].job_id).state == "queued"
    assert studio.stop(answers[1].job_id)
    wait_until(lambda: answers[2].job_id in studio.running(), timeout=30)  # started by itself on the freed GPU
    assert devices_of(studio, answers[2].job_id) == [1]
    stopped = studio.view(answers[1].job_id)  # the stand-in ignores the stop's meaning: it dies of SIGTERM
    assert stopped.state == "failed" and "signal 15 (SIGTERM)" in stopped.message


def test_a_job_of_several_gpus_waits_until_they_are_all_free(studios, tmp_path):
    studio = studios(tmp_path, devices=3, processes=2)
    first, second = (studio.submit(config(tmp_path, f"wide{i}")) for i in range(2))
    assert first.state == "running" and devices_of(studio, first.job_id) == [0, 1]
    assert second.state == "queued" and studio.free_devices() == [2]  # one GPU free is not enough
    studio.stop(first.job_id)
    wait_until(lambda: second.job_id in studio.running(), timeout=30)
    assert devices_of(studio, second.job_id) == [0, 1]


def test_on_the_cpu_one_job_runs_and_the_queue_can_be_cancelled_and_reordered(studios, tmp_path):
    studio = studios(tmp_path, devices=0)
    running, *queued = (studio.submit(config(tmp_path, "same")) for _ in range(4))
    assert running.state == "running" and [q.position for q in queued] == [1, 2, 3]
    folders = [Path(q.output_path).name for q in queued]
    assert folders == ["same-2", "same-3", "same-4"]  # each says which folder it will use
    assert studio.move_up(queued[2].job_id) == 2 and studio.move_up(queued[2].job_id) == 1
    assert studio.move_up(queued[2].job_id) == 1  # already first
    assert studio.cancel(queued[0].job_id) and not studio.cancel(queued[0].job_id)
    assert [job["job_id"] for job in studio.queued()] == [queued[2].job_id, queued[1].job_id]
    assert not Path(queued[0].output_path).exists()  # a cancelled job leaves nothing behind
    with pytest.raises(BusyError, match="already has a queued or running job"):
        studio.submit(config(tmp_path, "same-3"), resume=True)


def test_a_run_is_not_resumed_while_a_grid_of_it_waits_to_read_its_files(studios, tmp_path):
    studio = studios(tmp_path, devices=0)
    studio.submit(config(tmp_path, "other"))  # holds the one device: the grid waits
    (tmp_path / "drawn").mkdir()  # a run that has ended
    (tmp_path / "drawn" / "events.jsonl").write_text("")
    assert studio.submit_tool("grid", tmp_path / "drawn", ["final"]).state == "queued"
    with pytest.raises(BusyError, match="grid, sweep or score queued or drawing"):
        studio.submit(config(tmp_path, "drawn"), resume=True)
    assert studio.submit(config(tmp_path, "drawn")).output_path.endswith("drawn-2")  # a new run may start


def test_the_queue_is_kept_in_the_outputs_folder_and_survives_a_restart(studios, tmp_path):
    first = studios(tmp_path, devices=0)
    running = first.submit(config(tmp_path, "a"))
    waiting = first.submit(config(tmp_path, "b"))
    saved = json.loads(queue_path(tmp_path).read_text())
    assert [item["job_id"] for item in saved] == [waiting.job_id]
    assert saved[0]["config"]["output_path"] == waiting.output_path
    first.shutdown(timeout=10)  # stops the running job; the queued one stays on disk
    assert first.view(running.job_id).ended and not (tmp_path / "b").exists()

    second = studios(tmp_path, devices=0)
    assert second.view(waiting.job_id).state in ("starting", "running")  # the device was free: it started
    assert second.running() == [waiting.job_id] and second.queued() == []
    assert json.loads(queue_path(tmp_path).read_text()) == []


def test_a_job_is_in_the_runs_list_from_the_moment_start_accepts_it(studios, tmp_path):
    studio = studios(tmp_path, devices=0)
    running, waiting = studio.submit(config(tmp_path, "first")), studio.submit(config(tmp_path, "second"))
    rows = {row.id: row.state for row in list_runs(tmp_path)}  # the stand-in has written no event yet
    assert rows == {"first": "starting", "second": "queued"}
    assert studio.view(running.job_id).state == "starting" and studio.view(waiting.job_id).state == "queued"


def test_a_stopped_run_has_the_same_state_word_in_the_live_view_and_the_runs_list(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "launch_command", lambda config_path, *args, **kwargs: [
        sys.executable, "-c", STOPPABLE_STANDIN, str(config_path)])
    studio = Studio(tmp_path, devices=0)
    try:
        job = studio.submit(config(tmp_path, "halted"))
        wait_until(lambda: studio.view(job.job_id).state == "running", timeout=30, what="the first step")
        assert {row.id: row.state for row in list_runs(tmp_path)} == {"halted": "running"}
        assert studio.stop(job.job_id)
        wait_until(lambda: job.job_id not in studio.running(), timeout=30, what="the job's end")
        live = studio.view(job.job_id)
        listed = {row.id: row for row in list_runs(tmp_path)}["halted"]
        assert live.state == listed.state == "stopped" and live.message == "stopped by the user"
        assert live.step == listed.step == 1
    finally:
        studio.shutdown(timeout=10)
