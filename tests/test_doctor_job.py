"""The dataset doctor as a job of the page's pipeline: its events and findings file, a stop, a dataset busy for
captioning, and on the page: it starts at once, its findings reach the panel, a job is adopted after a server
restart and one killed there ends with exactly one final event."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from doctor_data import TRIGGER, make_set

from lora_core import doctor, doctor_job
from lora_core.eventlog import read_events
from lora_core.events import DoctorComplete, DoctorProgress, Interrupted
from studio.pipeline import BusyError, check_free


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))


def test_the_job_says_its_progress_writes_the_findings_and_ends_once_also_when_stopped(tmp_path, monkeypatch):
    folder = make_set(tmp_path / "set", 6, captions={5: "tag5, shared"})
    out = tmp_path / "job" / "findings.json"
    events = []
    args = doctor.parser().parse_args([str(folder), f"--trigger={TRIGGER}"])
    args.out = str(out)
    final = doctor_job.run_job(args, events.append, lambda: False)
    assert isinstance(final, DoctorComplete) and [event for event in events if event.terminal] == [final]
    progress = [event for event in events if isinstance(event, DoctorProgress)]
    assert progress and (progress[-1].done, progress[-1].total) == (6, 6)
    written = json.loads(out.read_text(encoding="utf-8"))
    expected = doctor.examine(folder, doctor.Target(trigger_words=[TRIGGER]))  # what the page computed itself
    assert written == [finding.to_dict() for finding in expected.findings]
    # --trigger reached the checks: training puts it first, so a caption without it lacks nothing
    assert "trigger_missing" in {finding.kind for finding in doctor.examine(folder).findings}
    assert "trigger_missing" not in {item["kind"] for item in written}
    assert (final.num_images, final.num_findings, final.path) == (6, len(written), str(out.resolve()))
    assert sum(final.severities.values()) == len(written)

    out.unlink()
    asked = []
    stopped = doctor_job.run_job(args, events.append, lambda: asked.append(1) or len(asked) > 2)
    assert isinstance(stopped, Interrupted) and stopped.step == 2 and not out.exists()
    monkeypatch.delenv("LORA_JOB_FOLDER", raising=False)
    args.out = None
    nowhere = doctor_job.run_job(args, events.append, lambda: False)
    assert nowhere.type == "error" and nowhere.field == "out"


def test_a_dataset_being_captioned_is_busy_for_the_doctor_and_the_other_way_round(tmp_path):
    folder = tmp_path.resolve()
    for running, asked in (("caption", "doctor"), ("doctor", "caption"), ("doctor", "doctor")):
        with pytest.raises(BusyError, match=f"a {running} job"):
            check_free(folder, asked, {folder: {running}})


def test_the_doctor_starts_at_once_beside_a_training_and_holds_no_device(tmp_path, monkeypatch):
    """On the CPU one training runs and the next waits; the doctor neither waits for it nor holds the CPU from
    the next training (the trainings are stand-in processes, as in test_jobs.py; the doctor is real)."""
    import sys

    from helpers import SHAPES_DATASET, tiny_config, wait_until

    from lora_core.configfile import parse_config
    from studio import launcher
    from studio.doctor_job import doctor_args
    from studio.jobs import Studio

    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [sys.executable, "-c",
                                                                           "import time; time.sleep(60)"])
    studio = Studio(tmp_path / "outputs", devices=0)
    try:
        training, waiting = (studio.submit(parse_config(tiny_config(SHAPES_DATASET, tmp_path / "outputs" / "run")))
                             for _ in range(2))
        assert (training.state, waiting.state) == ("running", "queued")
        checking = studio.submit_tool("doctor", make_set(tmp_path / "set", 3), doctor_args(TRIGGER))
        assert (checking.state, checking.position) == ("running", 0)
        pid = studio._active[checking.job_id].process.pid
        os.kill(pid, signal.SIGSTOP)  # held running while the training ends
        studio.stop(training.job_id)
        wait_until(lambda: waiting.job_id in studio.running(), 30, what="the queued training on the freed CPU")
        assert checking.job_id in studio.running()
        os.kill(pid, signal.SIGCONT)
        assert studio.wait(checking.job_id, timeout=60).state == "complete"
    finally:
        studio.shutdown(timeout=10)


@pytest.mark.e2e  # three doctor processes and two page servers' registries: about 5 s
def test_the_page_runs_the_doctor_at_once_and_adopts_it_after_a_restart(tmp_path):
    from helpers import wait_until

    from studio.doctor_job import DoctorJobPanel
    from studio.jobs import Studio

    folder = make_set(tmp_path / "set", 4)
    (folder / ".lora-studio-exclude").write_text("img_0003.png\n")
    first, second = Studio(tmp_path / "outputs", devices=0), None
    panel = DoctorJobPanel(first, lambda path: None)
    try:
        status, rows, job_id, answer = panel.start(str(folder), TRIGGER)
        assert answer["state"] == "running" and rows == [] and "doctor" in job_id, status
        view = first.wait(job_id, timeout=60)
        assert view.state == "complete", view.message
        summary, rows, files = panel.status(job_id)
        assert summary.startswith("3 image(s) checked") and "duplicate" in {row[1] for row in rows}
        assert files == ["img_0000.png", "img_0001.png", "img_0002.png", "img_0003.png"]  # the excluded one too
        assert panel.tick(job_id, "")[3] == job_id and panel.tick(job_id, job_id)[1] == {"__type__": "update"}

        paused = [panel.start(str(folder), "")[2]]
        pid = first._active[paused[0]].process.pid
        os.kill(pid, signal.SIGSTOP)  # still importing: the server goes while its job is on the way
        first.shutdown(stop_jobs=False)
        second = Studio(tmp_path / "outputs", devices=0)
        assert second._active[paused[0]].kind == "doctor"  # followed again, not queued again
        os.kill(pid, signal.SIGKILL)
        view = second.wait(paused[0], timeout=30)
        events = read_events(Path(view.output_path) / "events.jsonl")
        assert view.state == "failed" and "without a final event" in view.message
        assert sum(event.terminal for event in events) == 1  # the server's, for a job that could give none

        again = DoctorJobPanel(second, lambda path: None)
        job_id = again.start(str(folder), TRIGGER)[2]
        wait_until(lambda: second.view(job_id).ended, 60, what="the doctor job after the restart")
        assert again.status(job_id)[0].startswith("3 image(s) checked")
    finally:
        first.shutdown(stop_jobs=False)  # (again: a failure before the restart leaves it running)
        if second is not None:
            second.shutdown(timeout=10)
