"""The one command wrapper (lora_core/job.py `run_command`) that training and every tool run through: stdout
carries exactly one final event, a stop is the signal's exit status, a failure the work did not turn into an
event is one `error`, and a page job holds its job folder's lock while it works."""

from __future__ import annotations

import json
import os
import signal

from lora_core import runlock
from lora_core.events import Complete, Interrupted, Progress
from lora_core.job import run_command


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_stop_ends_with_one_interrupted_event_and_the_signals_exit_status(capfd):
    def work(emit, should_stop):
        emit(Progress(step=1, total_steps=2, loss=0.5, percent=50.0, lr=1e-4, it_per_s=1.0, eta_s=1.0, epoch=0))
        os.kill(os.getpid(), signal.SIGINT)
        assert should_stop()
        emit(Interrupted(step=1, message="stopped", checkpoint_path=None))
        emit(Complete(final_path="", total_time=1.0, step=1))  # a second final event is never written

    assert run_command(work, lambda event: 0 if event.type == "complete" else None) == 130
    events = _events(capfd.readouterr().out)
    assert [event["type"] for event in events] == ["progress", "interrupted"]


def test_a_failure_or_no_result_is_one_error_event_and_exit_status_1(capfd, caplog):
    def fails(emit, should_stop):
        raise RuntimeError("the work broke")

    assert run_command(fails, lambda event: 0) == 1
    assert run_command(lambda emit, should_stop: None, lambda event: 0) == 1
    events = _events(capfd.readouterr().out)
    assert [event["type"] for event in events] == ["error", "error"]
    assert "RuntimeError: the work broke" in events[0]["message"] and "without a result" in events[1]["message"]
    assert "the work broke" in caplog.text  # logged (on stderr) too


def test_a_page_job_holds_its_job_folder_and_logs_its_events_there_unless_its_work_writes_its_own(
        tmp_path, monkeypatch, capfd):
    folder = tmp_path / "job"
    monkeypatch.setenv(runlock.JOB_FOLDER_VARIABLE, str(folder))
    monkeypatch.setenv(runlock.TOKEN_VARIABLE, "t0ken")
    held = []

    def work(emit, should_stop):
        held.append(runlock.held_by(folder))
        emit(Complete(final_path="", total_time=1.0, step=2))

    done = lambda event: 0 if event.type == "complete" else None  # noqa: E731
    assert run_command(work, done) == 0
    assert held[0]["token"] == "t0ken" and held[0]["pid"] == os.getpid()
    assert runlock.held_by(folder) is None  # given back with the final event written
    assert [event["type"] for event in _events((folder / "events.jsonl").read_text())] == ["complete"]
    (folder / "events.jsonl").unlink()
    assert run_command(work, done, log_events=False) == 0  # training: run_job writes the run's events.jsonl
    assert not (folder / "events.jsonl").exists() and held[1]["token"] == "t0ken"
    assert len(_events(capfd.readouterr().out)) == 2
