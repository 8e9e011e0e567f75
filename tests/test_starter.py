"""The job starter (studio/starter.py): one-process jobs forked from a process that imported the engine once,
each what a spawned job is (its session, files and exit status), and spawned instead when it cannot fork them;
and the server's short children (`run_python`: the GPU count, the estimate, a model's family), forked the same
way and answering as `subprocess.run` does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import SHAPES_DATASET, tiny_config, wait_until

from lora_core import runlock
from lora_core.configfile import parse_config
from lora_core.runtail import RecordTail
from studio import preview
from studio import starter as starter_module
from studio.children import run_python
from studio.launcher import JobProcess, _count_devices, job_environment, train_command, validation_report
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


# --- the server's short children (studio.children.run_python): the GPU count, --validate-only, a model's family ---
CHILD = r'''
import os, sys, time
print(os.getpid(), os.getppid(), os.environ.get("CHILD_MARK"), sys.argv[1:], flush=True)
print("to stderr", file=sys.stderr)
time.sleep(float(sys.argv[1]))
print("done")
sys.exit(int(sys.argv[2]))
'''


@pytest.fixture(scope="module")
def warm_starter():
    """One starter for the short children's tests (importing the engine is its cost, paid once here)."""
    starter = Starter(base={**os.environ, "CHILD_MARK": "server-side"})
    yield starter
    starter.close()


def child_environment(starter: Starter) -> dict[str, str]:
    return job_environment(None, 1, None, starter.base)


def test_a_light_child_is_spawned_while_the_starter_still_imports_and_the_starter_is_warmed():
    """The GPU count imports torch alone: the server's first Start must not wait for the engine's import."""
    cold = Starter(base={**os.environ, "CHILD_MARK": "server-side"})
    try:
        result = run_python(["-c", CHILD, "0", "0"], child_environment(cold), cold, timeout=60,
                            spawn_while_importing=True)
        assert int(result.stdout.split()[1]) == os.getpid() and result.returncode == 0  # spawned, not forked
        assert cold._process is not None and not cold.ready  # the starter is importing meanwhile
    finally:
        cold.close()  # still importing: ended at once


@pytest.mark.e2e
def test_a_short_child_is_forked_from_the_starter_and_answers_as_subprocess_run_does(warm_starter):
    environment = child_environment(warm_starter)
    forked = run_python(["-c", CHILD, "0", "3"], environment, warm_starter, timeout=120)
    spawned = run_python(["-c", CHILD, "0", "3"], environment, None, timeout=120)
    for result in (forked, spawned):
        _pid, parent, mark, argv = result.stdout.split(" ", 3)
        assert (result.returncode, mark, argv.splitlines()) == (3, "server-side", ["['0', '3']", "done"])
        assert result.stderr == "to stderr\n"
    assert int(forked.stdout.split()[1]) == warm_starter._process.pid  # no new import of the engine
    assert int(spawned.stdout.split()[1]) == os.getpid()
    assert not cuda_driver_loaded_in(warm_starter._process.pid)  # the children may use CUDA; the starter never
    assert _count_devices(warm_starter) == _count_devices(None)


def cuda_driver_loaded_in(pid: int) -> bool:
    return "libcuda.so" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.e2e
def test_a_short_child_that_hangs_is_killed_at_its_timeout_and_one_that_dies_says_how(warm_starter):
    environment = child_environment(warm_starter)
    run_python(["-c", "pass"], environment, warm_starter, timeout=120)  # warm: the timeout is the child's own
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        run_python(["-c", CHILD, "600", "0"], environment, warm_starter, timeout=6)  # time to print its pid
    pid = int(hung.value.stdout.split()[0])
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
               what="the hung child to go")
    killed = run_python(["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], environment,
                        warm_starter, timeout=120)
    assert killed.returncode == -signal.SIGKILL  # as subprocess.run tells it


@pytest.mark.e2e
def test_the_pages_estimate_and_model_family_are_forked_and_a_child_outlives_a_starter_that_dies(
        warm_starter, monkeypatch, tmp_path):
    """Last of the module's tests: it kills the shared starter."""
    def spawned(*args, **kwargs):
        raise AssertionError("spawned: the starter should have forked it")

    with monkeypatch.context() as patched:
        patched.setattr(starter_module.subprocess, "run", spawned)
        patched.setattr(preview, "_described", {})
        report = validation_report(config(tmp_path / "out", steps=1), starter=warm_starter)
        words, problem, family = preview.describe_model("builtin:tiny-sd", warm_starter)
    assert report["ok"] and report["total_steps"] == 1
    assert (problem, family) == (None, "sd1") and words.startswith("SD 1.x")

    answer: list = []  # the starter dies while a child runs: the child's answer still comes
    asking = threading.Thread(target=lambda: answer.append(
        run_python(["-c", CHILD, "8", "0"], child_environment(warm_starter), warm_starter, timeout=120)))
    asking.start()
    wait_until(lambda: any(key > 0 for key in warm_starter._jobs), 60, what="the child's pid")
    warm_starter._process.kill()
    asking.join(60)
    assert answer and answer[0].returncode is None and answer[0].stdout.endswith("done\n")  # its status is lost
