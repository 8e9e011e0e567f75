"""The job starter (studio/starter.py): one-process jobs forked from a process that imported the engine once,
each what a spawned job is (its session, files and exit status), and spawned instead when it cannot fork them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from helpers import SHAPES_DATASET, tiny_config, wait_until

from lora_core import runlock
from lora_core.configfile import parse_config
from lora_core.runtail import RecordTail
from studio.launcher import JobProcess, job_environment, train_command
from studio.starter import PACKAGE_ROOT, StartedJob, Starter, cuda_driver_loaded


def start_training(folder, run_config, starter) -> JobProcess:
    return JobProcess.start(folder, train_command(folder, run_config), run_config, starter=starter)


def final_event(folder):
    """The final event of the run in `folder`, or None while it has none."""
    return RecordTail(folder).update().terminal


def config(folder, **overrides):
    return parse_config(tiny_config(SHAPES_DATASET, folder, checkpoint_steps=1000, validation_steps=1000,
                                    **overrides))


@pytest.mark.e2e
def test_jobs_are_forked_from_one_starter_and_keep_their_files_signals_and_exit_status(tmp_path):
    starter = Starter()
    try:
        first = start_training(tmp_path / "first", config(tmp_path / "first", steps=2), starter)
        killed = start_training(tmp_path / "killed", config(tmp_path / "killed", steps=5000), starter)
        assert killed.pid == 0 and killed.alive()  # asked of the starter, which is still importing
        killed.kill()  # kept until the starter answers with the pid
        wait_until(lambda: not first.alive() and not killed.alive(), 120, what="both jobs to end")
        assert first.popen.poll() == 0 and final_event(first.folder).type == "complete"
        assert (first.folder / "stderr.log").read_text().startswith("--- ")  # the job's stderr, in its folder
        assert killed.popen.poll() == -signal.SIGKILL and "signal 9 (SIGKILL)" in killed.describe_exit()
        assert final_event(killed.folder) is None  # no final event: the page records it as lost

        long = start_training(tmp_path / "long", config(tmp_path / "long", steps=5000), starter)
        wait_until(lambda: long.pid, 120, what="the pid")
        process = psutil.Process(long.pid)
        assert process.ppid() == starter._process.pid  # forked, not spawned: no new import
        assert os.getsid(long.pid) == long.pid  # a session of its own, as a spawned job has
        assert JobProcess.attach(long.folder).pid == long.pid  # job.json has the pid a later server finds
    finally:
        starter.close()
    assert long.alive(), "a job outlives the starter (and the server) that started it"
    wait_until(lambda: any(event.type == "progress" for event in read(long.folder)), 120, what="a training step")
    long.terminate()  # the page's Stop, with the starter gone: the job saves a checkpoint
    wait_until(lambda: not long.alive(), 120, what="the stop")
    assert final_event(long.folder).type == "interrupted"
    assert "unknown (it was started by the job starter" in long.describe_exit()


def read(folder):
    from lora_core.eventlog import read_events

    path = folder / "events.jsonl"
    return read_events(path) if path.is_file() else []


@pytest.mark.e2e
def test_a_job_the_starter_never_answered_is_spawned_instead(tmp_path):
    starter = Starter()
    try:
        job = start_training(tmp_path / "run", config(tmp_path / "run", steps=1), starter)
        starter._process.kill()  # ends before it has imported the engine, let alone forked the job
        wait_until(lambda: job.pid, 120, what="the spawned job's pid")
        assert psutil.Process(job.pid).ppid() == os.getpid()  # spawned by this process after all
        wait_until(lambda: not job.alive(), 120, what="the job to end")
        assert job.popen.poll() == 0 and final_event(job.folder).type == "complete"
        later = start_training(tmp_path / "later", config(tmp_path / "later", steps=1), starter)
        assert later.pid and psutil.Process(later.pid).ppid() == os.getpid()  # spawned at once from now on
        wait_until(lambda: not later.alive(), 120, what="the later job to end")
    finally:
        starter.close()


@pytest.mark.e2e
def test_a_job_forked_by_a_starter_that_died_before_answering_is_found_by_its_lock_never_started_twice(
        tmp_path, monkeypatch):
    monkeypatch.setattr(StartedJob, "_started", lambda self, pid: None)  # its answer with the pid is lost
    starter = Starter()
    try:
        job = start_training(tmp_path / "run", config(tmp_path / "run", steps=5000), starter)
        wait_until(lambda: runlock.held_by(job.folder), 120, what="the forked job's lock")
        starter._process.kill()  # the starter dies with the job forked and its answer never sent
        wait_until(lambda: starter._closed, 30, what="the server to see the starter end")
    finally:
        starter.close()
    assert job.popen.lost and job.pid == 0 and job.alive()  # known only by the lock it holds
    wait_until(lambda: any(event.type == "progress" for event in read(job.folder)), 120, what="a training step")
    job.terminate()  # proven by the lock (pid, token, the lock file open in that process), then SIGTERM
    wait_until(lambda: not job.alive(), 120, what="the stop")
    events = read(job.folder)
    assert [event.type for event in events].count("started") == 1, "the job was started twice"
    assert sum(event.terminal for event in events) == 1 and final_event(job.folder).type == "interrupted"


def test_a_job_with_another_environment_is_not_forked_from_the_starter(tmp_path):
    environment = job_environment(config(tmp_path / "out"), 1, None, base={"HF_HUB_OFFLINE": "1"})
    starter = Starter()
    starter.environment = dict(environment)
    assert starter.accepts({**environment, "CUDA_VISIBLE_DEVICES": "1"})  # read when CUDA starts: per job
    assert not starter.accepts({**environment, "HF_HUB_OFFLINE": "0"})  # read when huggingface_hub is imported
    assert not cuda_driver_loaded()  # this machine has no CUDA: the starter forks


class AnswersOf:
    """A stand-in for the starter's process: its answers, already written, and a wait that returns."""

    def __init__(self, *answers):
        self.stdout = [json.dumps(answer) + "\n" for answer in answers]

    def wait(self):
        return 0


def test_a_job_whose_pid_cannot_be_recorded_does_not_stop_the_server_following_the_others():
    """CI saw this: the first job's folder went while its pid was being written, and with the thread that
    reads the starter's answers gone every later job stayed 'starting' for good."""
    starter, seen = Starter(), []

    def folder_gone(pid):
        raise FileNotFoundError(f"no run folder for {pid}")

    broken, followed = StartedJob(None, folder_gone), StartedJob(None, seen.append)
    starter._jobs = {-1: broken, -2: followed}
    starter._read(AnswersOf({"id": 1, "pid": 101}, {"id": 2, "pid": 102}, {"exited": 101, "status": 1},
                            {"exited": 102, "status": 0}))
    assert broken.pid == 101 and broken.poll() == 1
    assert seen == [102] and followed.poll() == 0


NOISY_STARTER = r'''
import builtins, os, runpy, sys
real_import = builtins.__import__
def noisy_import(name, *args, **kwargs):
    if name == "lora_core.cli":  # one of the modules the starter imports before it answers
        os.write(1, b"native noise\n")  # as a C library writes to the descriptor, under Python's sys.stdout
        print("python noise", flush=True)
    return real_import(name, *args, **kwargs)
builtins.__import__ = noisy_import
sys.argv = ["starter"]
runpy.run_module("studio.starter", run_name="__main__")
'''


@pytest.mark.e2e
def test_what_the_starters_imports_print_goes_to_stderr_not_into_its_answers():
    run = subprocess.run([sys.executable, "-c", NOISY_STARTER], cwd=PACKAGE_ROOT, input="", capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ['{"ready": true}']
    assert "native noise" in run.stderr and "python noise" in run.stderr
