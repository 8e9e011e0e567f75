"""One writer per run folder (lora_core/runlock.py), and the page's one job pipeline (studio/pipeline.py,
studio/jobs.py) around it: readers, restarts, proof before a signal, damaged files, the queue's limits.
The jobs here are small stand-in processes (no torch): seconds, not minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from helpers import SHAPES_DATASET, tiny_config, wait_until

from lora_core import runlock
from lora_core.configfile import config_to_file_dict, parse_config
from lora_core.eventlog import EventLog
from lora_core.events import Interrupted, Progress, Started
from lora_core.job import run_job
from lora_core.runrecord import ACTIVE
from studio import launcher
from studio import queue as queue_module
from studio.jobfiles import jobs_folder
from studio.jobs import BusyError, Studio
from studio.queue import queue_path
from studio.runs import RunError, delete_run, list_runs

# A job's process as far as the page cares: it holds its folder's lock (exclusive, or shared with "shared"),
# says so on stdout, and on SIGTERM writes its one final event and ends.
HOLDER = """
import signal, sys, time
from pathlib import Path
from lora_core import runlock
from lora_core.events import Interrupted
from lora_core.eventlog import EventLog
folder = Path(sys.argv[1])
runlock.take(folder, shared=sys.argv[2:] == ["shared"])
def stop(*_):
    log = EventLog(folder / "events.jsonl")
    log(Interrupted(step=0, message="stopped by the user", checkpoint_path=None))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def hold():
    """Start stand-in jobs holding a folder's lock; each is killed after the test."""
    started: list[subprocess.Popen] = []

    def start(folder: Path, shared: bool = False, token: str = "") -> subprocess.Popen:
        environment = {**os.environ, runlock.TOKEN_VARIABLE: token}
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), *(["shared"] if shared else [])],
                                   stdout=subprocess.PIPE, text=True, env=environment)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture
def studios():
    made: list[Studio] = []

    def make(outputs: Path, **options) -> Studio:
        made.append(Studio(outputs, devices=0, **options))
        return made[-1]

    yield make
    for studio in made:
        studio.shutdown(timeout=10)


def config(outputs: Path, name: str):
    return parse_config(tiny_config(SHAPES_DATASET, outputs / name))


def stopped_run(folder: Path) -> Path:
    """A run that trained one step and was stopped, as the engine leaves it."""
    log = EventLog(folder / "events.jsonl")
    log(Started(total_steps=9, num_images=1, device="cpu", mixed_precision="no", model_family="sd15",
                output_path=str(folder)))
    log(Progress(step=1, total_steps=9, loss=0.5, percent=11.0, lr=1e-4, it_per_s=1.0, eta_s=8.0, epoch=0))
    log(Interrupted(step=1, message="stopped by the user", checkpoint_path=None))
    log.close()
    time.sleep(0.05)  # a process started after this final event is a later part of the run
    return folder


def test_a_second_writer_is_refused_naming_the_folder_and_its_holder_until_the_kernel_frees_it(hold, tmp_path):
    run = tmp_path / "run"
    writer = hold(run)
    assert runlock.holder(run)["pid"] == writer.pid
    with pytest.raises(runlock.FolderBusy, match=rf"{run}.*process {writer.pid}"):
        runlock.take(run, wait_s=0.2)
    # the engine's one training entry (the CLI and train_lora.py, --resume or not) refuses before writing
    events = []
    refused = run_job(config(tmp_path, "run"), events.append, lambda: False, resume=True)
    assert refused.type == "error" and refused.field == "output_path" and str(writer.pid) in refused.message
    assert events == [refused] and not (run / "events.jsonl").exists()  # nothing of it written
    writer.kill()  # SIGKILL: no chance to give the lock back; the kernel does
    writer.wait()
    assert runlock.holder(run) is None
    runlock.take(run, wait_s=0.2).release()

    drawn = tmp_path / "drawn"
    grid = hold(drawn, shared=True)  # a grid or sweep reading the run
    runlock.take(drawn, shared=True, wait_s=0.2).release()  # another reader may draw it too
    with pytest.raises(runlock.FolderBusy, match="grid or sweep"):
        runlock.take(drawn, wait_s=0.2)  # training would rewrite what it reads
    assert runlock.held_by(drawn) is None and grid.poll() is None  # a reader is no writer


def test_every_reader_shows_a_held_run_as_running_and_delete_and_resume_refuse(hold, studios, tmp_path):
    run = stopped_run(tmp_path / "halted")
    cli = hold(run)  # `train_lora.py --resume` of it from a terminal: no event of its own yet
    studio = studios(tmp_path)
    assert {row.id: row.state for row in list_runs(tmp_path)} == {"halted": "starting"}
    with pytest.raises(RunError, match="still running"):
        delete_run(tmp_path, "halted")
    with pytest.raises(BusyError, match=rf"halted is in use by process {cli.pid}"):
        studio.submit(config(tmp_path, "halted"), resume=True)
    with pytest.raises(BusyError, match="in use by process"):
        studio.submit_tool("grid", run, ["--steps", "final"])
    cli.kill()
    cli.wait()
    assert {row.id: row.state for row in list_runs(tmp_path)} == {"halted": "stopped"}
    delete_run(tmp_path, "halted")
    assert not run.exists()


def write_job(folder: Path, **record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(json.dumps({"started_at": datetime.now(UTC).isoformat(), **record}))
    return folder


def test_a_restarted_server_adopts_a_job_without_a_pid_and_signals_only_what_it_can_prove(hold, studios, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [
        sys.executable, "-c", "import time; time.sleep(60)"])
    # the server died right after starting a sweep: its job.json has the job's token but never got its pid
    orphan = write_job(tmp_path / ".studio" / "jobs" / "j-orphan", job_id="j-orphan", kind="sweep",
                       token="t" * 32, target=str(stopped_run(tmp_path / "drawn")))
    job = hold(orphan, token="t" * 32)
    # and a resume of a training, whose job holds its own folder's lock (its command wrapper) with its token
    resumed = write_job(tmp_path / ".studio" / "jobs" / "j-train", job_id="j-train", kind="train", token="u" * 32,
                        target=str(stopped_run(tmp_path / "again")))
    trainer = hold(resumed, token="u" * 32)
    # a forged job.json names a process that is no job of ours
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_job(tmp_path / "forged", job_id="j-forged", kind="train", token="f" * 32, pid=victim.pid,
                  start_time=psutil.Process(victim.pid).create_time())
        studio = studios(tmp_path)
        assert set(studio.running()) == {"j-orphan", "j-forged", "j-train"}
        assert studio.view("j-orphan").state in ACTIVE
        assert studio.submit(config(tmp_path, "next")).state == "queued"  # the sweep holds the device
        with pytest.raises(BusyError, match="sweep"):
            studio.submit(config(tmp_path, "drawn"), resume=True)  # and reads that run
        assert studio.stop("j-orphan") and studio.stop("j-forged") and studio.stop("j-train")
        wait_until(lambda: job.poll() is not None and trainer.poll() is not None, 20, what="the orphans' stop")
        assert studio.view("j-orphan").state == "stopped"
        time.sleep(0.5)
        assert victim.poll() is None, "the server signalled a process it could not prove was its job"
    finally:
        victim.kill()
        victim.wait()


def test_damaged_job_and_queue_files_cost_their_entry_only(studios, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [
        sys.executable, "-c", "import time; time.sleep(60)"])
    write_job(tmp_path / "minus", job_id="a", pid=-1, start_time=0)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "job.json").write_text("[" * 100_000 + "]" * 100_000)
    write_job(tmp_path / "zero", job_id="b", processes=0, pid="x", target="/a\u0000b")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "job.json")  # reading it would block the server for good
    good = {"job_id": "ok-1", "output_path": str(tmp_path / "queued"), "kind": "train",
            "config": json.loads(json.dumps(tiny_config(SHAPES_DATASET, tmp_path / "queued")))}
    queue_path(tmp_path).parent.mkdir()
    queue_path(tmp_path).write_text(json.dumps([
        1, {**good, "job_id": "../x"}, {**good, "job_id": "out", "output_path": "/etc/cron.d"},
        {**good, "job_id": "nul", "args": ["a\u0000b"]}, {**good, "job_id": "p0", "processes": 0}, good]))
    studio = studios(tmp_path)  # starts at all: nothing above stops it
    assert studio.running() == ["ok-1"] and studio.queued() == []  # the one sound entry started
    assert len(studio.damaged) == 5 + 4 and "outside the folders this server owns" in " ".join(studio.damaged)
    assert {row.id: row.state for row in list_runs(tmp_path)}.get("minus") == "failed"  # shown, not followed
    # an older server's job files in run folders were moved to the server's own folder, the FIFO left alone
    assert not (tmp_path / "minus" / "job.json").exists() and (jobs_folder(tmp_path) / "a" / "job.json").is_file()
    assert (tmp_path / "fifo" / "job.json").is_fifo()


def test_the_queue_has_a_limit_and_a_start_it_could_not_save_never_runs_later(studios, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [
        sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(queue_module, "MAX_QUEUED", 2)
    studio = studios(tmp_path)
    studio.submit(config(tmp_path, "running"))
    studio.submit(config(tmp_path, "one"))
    studio.submit(config(tmp_path, "two"))
    with pytest.raises(BusyError, match="queue already holds 2 jobs"):
        studio.submit(config(tmp_path, "three"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    studio.cancel(studio.queued()[0]["job_id"])
    monkeypatch.setattr(queue_module, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        studio.submit(config(tmp_path, "refused"))
    monkeypatch.undo()
    assert [Path(job["output_path"]).name for job in studio.queued()] == ["two"]  # not the refused one
    assert "refused" not in json.dumps(json.loads(queue_path(tmp_path).read_text()))


def test_a_job_is_listed_while_it_leaves_the_queue_and_a_restart_never_starts_it_twice(studios, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [
        sys.executable, "-c", "import time; time.sleep(60)"])
    studio = studios(tmp_path)
    seen: list[set[str]] = []
    remove = studio._queue.remove

    def watched(job_id):  # the moment the job has left queue.json: the Runs list must still show it
        removed = remove(job_id)
        seen.append({row.id for row in list_runs(tmp_path)})
        return removed

    monkeypatch.setattr(studio._queue, "remove", watched)
    started = studio.submit(config(tmp_path, "first"))
    record_path = jobs_folder(tmp_path) / started.job_id / "job.json"  # the server's own folder, not the run's
    assert seen == [{"first"}] and record_path.is_file() and not Path(started.output_path, "job.json").exists()

    # the server dies after the job's job.json was written but before queue.json lost it
    entry = {"job_id": started.job_id, "output_path": started.output_path, "kind": "train",
             "config": config_to_file_dict(config(tmp_path, "first"))}
    record = record_path.read_text()
    studio.shutdown(timeout=10)  # (which removes a new run that never trained: put back what a kill -9 leaves)
    write_job(record_path.parent).joinpath("job.json").write_text(record)
    queue_path(tmp_path).write_text(json.dumps([entry]))
    again = studios(tmp_path)
    assert again.queued() == [] and again.running() == []


def test_a_resume_that_waited_while_a_cli_run_took_its_folder_is_refused_writing_nothing_there(hold, studios,
                                                                                            tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [
        sys.executable, "-c", "import time; time.sleep(60)"])
    run = stopped_run(tmp_path / "halted")
    before = (run / "events.jsonl").read_text()
    studio = studios(tmp_path)
    blocker = studio.submit(config(tmp_path, "blocker"))  # holds the CPU: the resume waits
    waiting = studio.submit(config(tmp_path, "halted"), resume=True)
    assert waiting.state == "queued"
    cli = hold(run)  # `train_lora.py --resume` from a terminal, meanwhile
    studio.stop(blocker.job_id)
    view = studio.wait(waiting.job_id, timeout=30)
    assert view.state == "failed" and f"in use by process {cli.pid}" in view.message
    assert (run / "events.jsonl").read_text() == before  # the CLI run's record is its own
